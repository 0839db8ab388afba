"""Drafter specs from the command line (``--draft``) turned into drafters."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from llmopt.config import ModelConfig
from llmopt.errors import UserError
from llmopt.loading.tokenizer import Tokenizer
from llmopt.speculative.drafters import (
    Drafter,
    ModelDrafter,
    NgramDrafter,
    SelfDrafter,
    model_cost,
    quantized_copy,
    truncated_model,
)

log = logging.getLogger(__name__)

DRAFT_HELP = ("draft for speculative decoding: a model (name, directory, .gguf, preset:NAME) sharing "
              "the target's tokenizer, self-int4[-gN], self-int8, self-layers:N (the target's first N "
              "layers) or ngram[:N] (prompt lookup with n-grams up to N tokens)")


@dataclass(frozen=True)
class DraftSpec:
    kind: str  # "model", "self-quant", "self-layers", "ngram"
    model: str | None = None
    quant: str = ""  # quantisation spec of a self-quant draft (llmopt.quant), e.g. "int4-g64"
    num_layers: int = 0
    max_ngram: int = 4


def parse_draft_spec(spec: str) -> DraftSpec:
    """Validate ``--draft`` before anything is loaded."""
    s = spec.strip()
    if not s:
        raise UserError("--draft is empty")
    if s.startswith(("self-int4", "self-int8")):
        # Any llmopt.quant spec of an int4/int8 scheme: self-int4, self-int4-g32, self-int8.
        return DraftSpec("self-quant", quant=s.removeprefix("self-"))
    if s.startswith("self-layers"):
        _, _, n = s.partition(":")
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--draft {spec!r}: use self-layers:N with N >= 1 (e.g. self-layers:8)")
        return DraftSpec("self-layers", num_layers=int(n))
    if s.startswith("self-"):
        raise UserError(f"unknown self-draft {spec!r}; known: self-int4[-gN], self-int8, self-layers:N")
    if s == "ngram" or s.startswith("ngram:"):
        _, _, n = s.partition(":")
        if n and (not n.isdigit() or int(n) < 2):
            raise UserError(f"--draft {spec!r}: use ngram or ngram:N with N >= 2")
        return DraftSpec("ngram", max_ngram=int(n) if n else 4)
    return DraftSpec("model", model=s)


def check_same_vocabulary(
    target_config: ModelConfig,
    target_tokenizer: Tokenizer | None,
    draft_config: ModelConfig,
    draft_tokenizer: Tokenizer | None,
    draft_name: str,
) -> None:
    """A draft proposes token ids: they only mean the same thing under the same tokenizer."""
    if draft_config.vocab_size != target_config.vocab_size:
        raise UserError(
            f"draft {draft_name} has a vocabulary of {draft_config.vocab_size} tokens, the target "
            f"{target_config.vocab_size}: a draft must share the target's tokenizer"
        )
    if target_tokenizer is None or draft_tokenizer is None:
        if target_tokenizer is not draft_tokenizer:
            log.warning("cannot compare tokenizers (one model has none); trusting equal vocab sizes")
        return
    if draft_tokenizer.vocab_size != target_tokenizer.vocab_size or any(
        draft_tokenizer.id_to_token(i) != target_tokenizer.id_to_token(i)
        for i in range(target_tokenizer.vocab_size)
    ):
        raise UserError(
            f"draft {draft_name} has a different tokenizer from the target's: a draft must share it"
        )


def build_drafter(
    spec: str | DraftSpec,
    target: nn.Module,
    target_tokenizer: Tokenizer | None,
    progress: bool = True,
) -> Drafter:
    """A drafter for ``target`` (a loaded model) from a ``--draft`` spec."""
    ds = parse_draft_spec(spec) if isinstance(spec, str) else spec
    if ds.kind == "ngram":
        return NgramDrafter(max_ngram=ds.max_ngram)
    if ds.kind == "self-layers":
        draft = truncated_model(target, ds.num_layers)
        return SelfDrafter(draft, target, f"self-layers:{ds.num_layers}", model_cost(draft, target))
    if ds.kind == "self-quant":
        draft = quantized_copy(target, ds.quant)
        return SelfDrafter(draft, target, f"self-{ds.quant}", model_cost(draft, target))
    assert ds.model is not None
    from llmopt.loading.loader import load_model

    ref = next(target.parameters())
    loaded = load_model(ds.model, device=ref.device, dtype=ref.dtype, progress=progress)
    check_same_vocabulary(target.config, target_tokenizer, loaded.config, loaded.tokenizer, ds.model)
    loaded.model.set_attention_backend(target.attention.name)
    return ModelDrafter(loaded.model, ds.model, model_cost(loaded.model, target))
