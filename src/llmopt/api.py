"""The Python API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llmopt.engine.generate import Generator, StreamCallback
from llmopt.engine.outputs import RequestOutput
from llmopt.errors import UserError
from llmopt.loading.loader import LoadedModel, load_model
from llmopt.sampling import SamplingParams

if TYPE_CHECKING:
    from llmopt.engine.llm_engine import EngineConfig, LLMEngine


class LLM:
    """A loaded model ready to generate.

    >>> llm = LLM("smollm2-135m", device="cpu")
    >>> llm.generate(["The capital of France is"], SamplingParams(max_new_tokens=8, temperature=0))
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "auto",
        progress: bool = True,
        compile: bool = False,
        compile_mode: str = "auto",
        engine: str = "static",
        engine_config: EngineConfig | None = None,
        loaded: LoadedModel | None = None,
        quant: str | None = None,
    ) -> None:
        # ``loaded``: a model loaded elsewhere (e.g. one tensor-parallel rank's shard).
        self.loaded: LoadedModel = (
            loaded if loaded is not None else load_model(model, device=device, dtype=dtype, progress=progress, quant=quant)
        )
        self.model = self.loaded.model
        self.model.set_attention_backend(attention)
        self.tokenizer = self.loaded.tokenizer
        self.device: torch.device = self.loaded.device
        # "static": the latency path (one static batch); "paged": continuous batching, paged KV.
        if engine not in ("static", "paged"):
            raise UserError(f"unknown engine {engine!r}; use static or paged")
        self.generator = Generator(self.model, self.tokenizer, self.device, compile=compile,
                                   compile_mode=compile_mode)
        self.engine: LLMEngine | None = None
        if engine == "paged":
            from llmopt.engine.llm_engine import LLMEngine

            self.engine = LLMEngine(self.model, self.tokenizer, self.device, engine_config)

    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        if self.tokenizer is None:
            raise UserError(f"{self.loaded.source} has random weights and no tokenizer; give token ids")
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            return self.tokenizer.encode_chat(messages)
        return self.tokenizer.encode(prompt)

    def warm_up(self, prompt: str | list[int], max_new_tokens: int, chat: bool = False,
                system: str | None = None) -> None:
        """Compile on a few tokens what generating ``max_new_tokens`` after ``prompt`` will run
        (its cache size included), so that run shows compiled speed. Eager generators just run."""
        ids = self.encode(prompt, chat=chat, system=system) if isinstance(prompt, str) else list(prompt)
        self.generator.warm_up([ids], max_new_tokens)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | None = None,
        chat: bool = False,
        system: str | None = None,
        stream: StreamCallback | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text, or token ids). Batched prompts give the same tokens as
        running them one by one."""
        params = params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        texts: list[str | None] = []
        ids: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                texts.append(p)
                ids.append(self.encode(p, chat=chat, system=system))
            else:
                texts.append(None)
                ids.append(list(p))
        if self.engine is not None:
            if stream is not None:
                raise UserError("streaming callbacks need the static engine; use the server to stream")
            outs = self.engine.generate(ids, params)
        else:
            outs = self.generator.generate(ids, params, stream=stream)
        for o, t in zip(outs, texts, strict=True):
            o.prompt = t
        return outs
