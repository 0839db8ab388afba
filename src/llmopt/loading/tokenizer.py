"""Tokenizer (``tokenizers`` library), chat templates (jinja2) and streaming detokenisation."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from llmopt.errors import CheckpointError, UserError


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised by transformers
        return value.get("content")
    return value


class Tokenizer:
    def __init__(
        self,
        tokenizer: Any,
        tokenizer_config: dict[str, Any],
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tk = tokenizer
        self.config = tokenizer_config
        self.bos_token = _token_str(tokenizer_config.get("bos_token"))
        self.eos_token = _token_str(tokenizer_config.get("eos_token"))
        self.bos_token_id = self._tk.token_to_id(self.bos_token) if self.bos_token else None
        self.add_bos_token = bool(tokenizer_config.get("add_bos_token", False))
        self.chat_template = chat_template or tokenizer_config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        eos: set[int] = set()
        if self.eos_token and self._tk.token_to_id(self.eos_token) is not None:
            eos.add(self._tk.token_to_id(self.eos_token))
        gen_eos = (generation_config or {}).get("eos_token_id")
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, list):
            eos.update(int(e) for e in gen_eos)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        added = self._tk.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(f"{model_dir} has no tokenizer.json")
        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        tok_cfg = _read_json(model_dir / "tokenizer_config.json")
        gen_cfg = _read_json(model_dir / "generation_config.json")
        template = None
        jinja = model_dir / "chat_template.jinja"
        if jinja.exists():
            template = jinja.read_text()
        elif (model_dir / "chat_template.json").exists():
            template = _read_json(model_dir / "chat_template.json").get("chat_template")
        return cls(tk, tok_cfg, gen_cfg, template)

    @classmethod
    def from_json(
        cls, tokenizer_json: dict[str, Any], tokenizer_config: dict[str, Any],
        generation_config: dict[str, Any] | None = None,
    ) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(json.dumps(tokenizer_json)), tokenizer_config, generation_config)

    # -- text <-> ids ------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._tk.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(i)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if not self.chat_template:
            raise UserError("this model has no chat template; run without --chat")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise UserError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise UserError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # Templates write their own BOS; adding special tokens again would double it.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    def save(self, out_dir: Path) -> None:
        self._tk.save(str(out_dir / "tokenizer.json"))
        cfg = dict(self.config)
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Decodes a short window of recent tokens (so byte-level merges across token boundaries come
    out right) and holds text back while it ends in the replacement character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids or [])
        self.skip = skip_special_tokens
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is held back at the end (a dangling partial character becomes U+FFFD)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}
