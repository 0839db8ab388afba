"""Explicit CUDA-graph capture of one step function (the ``regional`` compile mode's graphs).

torch.compile's ``reduce-overhead`` mode captures the graphs it compiles; the regional mode
compiles each decoder layer on its own (one compile serves every layer) and then captures the
whole step here, eager glue included, so a step is still one graph launch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from llmopt.devices import new_cuda_graph


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


class CapturedStep:
    """``fn(*tensors) -> tensor`` replayed from CUDA graphs, one per argument shape.

    Arguments are copied into static buffers before each replay; the returned tensor is the
    graph's static output, overwritten by the next call (the graphs share one memory pool), so
    consume it before calling again. ``key()`` names what the graphs bake in besides their inputs
    (the KV cache they write): when it changes, every graph is dropped. ``fn`` runs ``warmup``
    times with the real arguments before a capture (compiling and autotuning happen there), so it
    must be idempotent: a step that writes its positions' keys and values is.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], key: Callable[[], Hashable],
                 warmup: int = 2) -> None:
        self.fn = fn
        self.key = key
        self.warmup = warmup
        self.captures = 0
        self._graphs: dict[Hashable, _Graph] = {}
        self._key: Hashable = None
        self._pool = None

    def reset(self) -> None:
        self._graphs, self._key, self._pool = {}, None, None

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = self.key()
        if key != self._key:
            self.reset()
            self._key = key
        shapes = tuple((a.shape, a.dtype, a.device) for a in args)
        g = self._graphs.get(shapes)
        if g is None:
            g = self._graphs[shapes] = self._capture(args)
        else:
            for buf, a in zip(g.inputs, args, strict=True):
                buf.copy_(a, non_blocking=True)
        g.graph.replay()
        return g.output

    def _capture(self, args: tuple[torch.Tensor, ...]) -> _Graph:
        device = args[0].device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        inputs = [a.clone() for a in args]
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = new_cuda_graph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.fn(*inputs)
        self.captures += 1
        return _Graph(graph, inputs, out)  # capture only records: the caller replays it


def kv_cache_key(model: torch.nn.Module) -> tuple[int, int, int]:
    """What a captured step of ``model`` bakes in besides its inputs: its static KV cache."""
    k = model.model.layers[0].self_attn.kv_cache.k_cache  # type: ignore[union-attr, index]
    return (k.data_ptr(), model.max_batch_size, model.max_seq_len)  # type: ignore[return-value]
