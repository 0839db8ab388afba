"""The serving engine under tensor parallelism: rank 0 schedules, every rank runs each step.

Every rank builds the same ``LLMEngine`` (so the paged KV pools, warm-up steps and CUDA-graph
captures happen in step, collectives included). Rank 0 serves: its scheduler decides each step
and ``BroadcastRunner`` sends that step (``SchedulerOutput``) to the other ranks before running
it. The others sit in ``run_worker``: receive a step, run its forward (their logits take part in
the all-reduces and the vocabulary all-gather; only rank 0 samples), until rank 0 sends ``None``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmopt.engine.model_runner import ModelRunner, RunnerConfig
from llmopt.engine.scheduler import ModelRunnerOutput, SchedulerOutput
from llmopt.parallel.process_group import TPContext

log = logging.getLogger(__name__)


class TPModelRunner(ModelRunner):
    """A model runner whose KV pool has the same number of blocks on every rank: block ids
    chosen by rank 0's scheduler must exist everywhere, and free GPU memory differs a little
    between GPUs, so each rank's estimate is reduced to the smallest."""

    def __init__(self, model: nn.Module, device: torch.device, config: RunnerConfig,
                 tp: TPContext) -> None:
        self.tp = tp
        super().__init__(model, device, config)

    def _blocks_from_gpu_memory(self) -> int:
        n = torch.tensor([super()._blocks_from_gpu_memory()], device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=self.tp.group)
        return int(n.item())


class BroadcastRunner:
    """Rank 0's runner: each step goes to the other ranks first, then runs here."""

    def __init__(self, runner: ModelRunner, tp: TPContext) -> None:
        self.runner = runner
        self.tp = tp
        self.stopped = False

    def __getattr__(self, name: str) -> Any:  # num_blocks, config, ... of the wrapped runner
        return getattr(self.runner, name)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        _broadcast(_for_workers(sched), self.tp)
        return self.runner.execute(sched)

    def stop(self) -> None:
        """Release the other ranks from ``run_worker`` (once; later calls do nothing)."""
        if not self.stopped:
            self.stopped = True
            _broadcast(None, self.tp)


def _for_workers(sched: SchedulerOutput) -> SchedulerOutput:
    """What a worker needs of a step: not the token histories (only sampling reads them)."""
    seqs = [dataclasses.replace(s, all_token_ids=[]) for s in sched.seqs]
    return dataclasses.replace(sched, seqs=seqs)


def _broadcast(obj: SchedulerOutput | None, tp: TPContext) -> SchedulerOutput | None:
    box = [obj]
    if tp.device.type == "cuda":
        # the engine steps in its own thread, whose current CUDA device is not set by default
        torch.cuda.set_device(tp.device)
    dist.broadcast_object_list(box, src=0, group=tp.group, device=tp.device)
    return box[0]


def run_worker(runner: ModelRunner, tp: TPContext) -> int:
    """A non-zero rank's serving loop: run every step rank 0 schedules; returns the steps run."""
    steps = 0
    while True:
        sched = _broadcast(None, tp)
        if sched is None:
            log.info("rank %d: rank 0 stopped serving after %d steps", tp.rank, steps)
            return steps
        runner.execute(sched, sample=False)
        steps += 1


def make_tp_runner(tp: TPContext):  # -> Callable[[nn.Module, torch.device, RunnerConfig], ...]
    """The ``make_runner`` for ``LLMEngine`` on this rank."""

    def make(model: nn.Module, device: torch.device, config: RunnerConfig) -> Any:
        runner = TPModelRunner(model, device, config, tp)
        return BroadcastRunner(runner, tp) if tp.is_main else runner

    return make
