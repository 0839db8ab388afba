"""``ShardedLLM``: the ``LLM`` API on one rank of a tensor-parallel group.

Every rank runs the same generation loop on the same (all-gathered) logits, so every rank picks
the same tokens; only the seed of random sampling has to be agreed on, which rank 0 does.
"""

from __future__ import annotations

import random
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from llmopt.api import LLM
from llmopt.engine.generate import StreamCallback
from llmopt.engine.outputs import RequestOutput
from llmopt.parallel.loading import ShardedLoadedModel, load_for_rank
from llmopt.parallel.process_group import TPContext, init_tp
from llmopt.sampling import SamplingParams

if TYPE_CHECKING:
    from llmopt.engine.llm_engine import EngineConfig


class ShardedLLM(LLM):
    def __init__(
        self,
        model: str = "smollm2-135m",
        tp: int = 2,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "auto",
        allreduce: str = "auto",
        progress: bool = True,
        engine: str = "static",
        engine_config: EngineConfig | None = None,
        quant: str | None = None,
        compile: bool = False,
        compile_mode: str = "auto",
    ) -> None:
        self.tp: TPContext = init_tp(tp, device, allreduce)
        shard: ShardedLoadedModel = load_for_rank(
            model,
            self.tp,
            dtype=dtype,
            quant=quant,
            progress=progress and self.tp.is_main and sys.stderr.isatty(),
        )
        super().__init__(
            model,
            device=str(shard.device),
            dtype=dtype,
            attention=attention,
            progress=progress,
            compile=compile,
            compile_mode=compile_mode,
            engine=engine,
            engine_config=engine_config,
            loaded=shard,
        )

    @property
    def is_main(self) -> bool:
        return self.tp.is_main

    def broadcast(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank (e.g. a prompt only rank 0 could read)."""
        return self.tp.broadcast_object(obj)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | None = None,
        chat: bool = False,
        system: str | None = None,
        stream: StreamCallback | None = None,
    ) -> list[RequestOutput]:
        params = params or SamplingParams()
        if not params.greedy and params.seed is None:
            # Unseeded sampling would draw different tokens on different ranks and desync them.
            params = replace(params, seed=self.tp.broadcast_object(random.randrange(2**31)))
        return super().generate(prompts, params, chat=chat, system=system, stream=stream)
