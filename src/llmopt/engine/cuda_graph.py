"""Explicit CUDA-graph capture of one step function (the ``regional`` compile mode's graph).

torch.compile's ``reduce-overhead`` mode captures the graphs it compiles; the regional mode
compiles each decoder layer on its own (one compile serves every layer) and then captures the
whole decode step here, eager glue included, so a step is still one graph launch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class CapturedStep:
    """``fn(*tensors) -> tensor`` replayed from one CUDA graph.

    Arguments are copied into static buffers before each replay; the returned tensor is the
    graph's static output, overwritten by the next call, so read it before calling again.
    ``key`` names whatever else the graph bakes in (the KV cache it writes): a new key, or new
    argument shapes, capture a new graph. ``fn`` runs ``warmup`` times with the real arguments
    before capture (compiling and autotuning happen there), so it must be idempotent: a decode
    step that writes this position's keys and values is.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2) -> None:
        self.fn = fn
        self.warmup = warmup
        self.captures = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._key: Hashable = None
        self._inputs: list[torch.Tensor] = []
        self._output: torch.Tensor | None = None

    def reset(self) -> None:
        self._graph, self._key, self._inputs, self._output = None, None, [], None

    def __call__(self, *args: torch.Tensor, key: Hashable = None) -> torch.Tensor:
        full_key = (key, tuple((a.shape, a.dtype, a.device) for a in args))
        if self._graph is None or full_key != self._key:
            return self._capture(args, full_key)
        for buf, a in zip(self._inputs, args, strict=True):
            buf.copy_(a, non_blocking=True)
        self._graph.replay()
        assert self._output is not None
        return self._output

    def _capture(self, args: tuple[torch.Tensor, ...], key: Hashable) -> torch.Tensor:
        self.reset()
        inputs = [a.clone() for a in args]
        side = torch.cuda.Stream(device=inputs[0].device)
        side.wait_stream(torch.cuda.current_stream(side.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*inputs)
        torch.cuda.current_stream(side.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(*inputs)
        graph.replay()  # capture only records: run the step once for real
        self._graph, self._key, self._inputs, self._output = graph, key, inputs, out
        self.captures += 1
        return out
