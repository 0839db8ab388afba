"""torch.compile settings, in one place. The compile caches live under the llmopt cache dir, so a
second process on the same machine starts from compiled artefacts instead of from scratch."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from llmopt.loading.resolve import cache_dir

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "reduce-overhead", "regional", "max-autotune", "max-autotune-no-cudagraphs", "default")
# regional: each decoder layer is compiled on its own (identical layers share one compiled graph,
# so a cold compile costs one layer, not all of them), and the decode step is captured whole as
# one CUDA graph by engine.cuda_graph.CapturedStep.
_configured = False


def resolve_compile_mode(mode: str, device: Any) -> str:
    """``auto``: ``regional`` on one GPU (measured on an H200, 7B bf16: 227.9 tok/s with a 21.6 s
    cold compile against 222.0 and 87.4 s whole-model); ``reduce-overhead`` elsewhere: on CPU the
    whole-model compile freezes and prepacks the weights (regional cannot), and under tensor
    parallelism the whole-model graphs are the measured ones."""
    from llmopt.errors import UserError

    if mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {mode!r}; known: {', '.join(COMPILE_MODES)}")
    if mode != "auto":
        return mode
    import torch
    import torch.distributed as dist

    sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return "regional" if torch.device(device).type == "cuda" and not sharded else "reduce-overhead"


def configure_inductor() -> None:
    global _configured
    if _configured:
        return
    root = cache_dir() / "compile"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.coordinate_descent_tuning = os.environ.get("LLMOPT_COORDINATE_DESCENT", "1") == "1"
    inductor_config.triton.unique_kernel_names = True
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = True
    _configured = True
    log.info("inductor cache at %s", os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_fn(
    fn: Callable[..., Any], mode: str = "reduce-overhead", dynamic: bool = False, device: Any = None,
) -> Callable[..., Any]:
    """torch.compile with llmopt's settings. On a CPU ``device`` the mode (CUDA graphs, GPU
    autotuning) has no meaning; inductor's freezing is used instead: weights become constants
    that oneDNN prepacks into its blocked layout, which is what makes CPU GEMVs fast (measured in
    bench/results/cpu_generate_vs_hf.json)."""
    from llmopt.errors import UserError

    if mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {mode!r}; known: {', '.join(COMPILE_MODES)}")
    configure_inductor()
    import torch

    if device is not None and torch.device(device).type == "cpu":
        # The global switch, not options={"freezing": True}: with torch 2.13 the per-call option
        # leaves linears as aten::mm (no prepacking), measured in a profile. A process compiles
        # for one device type, so the global setting does not leak into GPU graphs.
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        return torch.compile(fn, fullgraph=True, dynamic=dynamic)
    if mode in ("auto", "regional"):  # callers that compile a whole function
        mode = "reduce-overhead"
    return torch.compile(fn, mode=None if mode == "default" else mode, fullgraph=True, dynamic=dynamic)


class CompiledLayers:
    """The ``regional`` mode's compile: one ``torch.compile`` of each decoder layer's call, active
    only inside ``active()`` (or a function made by ``wrap``), so prefill and other multi-token
    calls on the same model stay eager instead of compiling a graph per length.

    Layers share their code and their parameters are graph inputs, so dynamo compiles the first
    layer and reuses that graph for the rest: a cold compile costs one layer, not all of them.
    Size-1 dimensions are specialised, so a one-token step gets a static graph. No CUDA graphs
    here: the caller captures the whole step (``engine.cuda_graph.CapturedStep``). No CPU freezing:
    frozen weights would be constants, one compile per layer.
    """

    def __init__(self, model: Any) -> None:
        configure_inductor()
        import torch
        import torch._inductor.config as inductor_config

        # Off even where a whole-model CPU compile in this process turned it on: with freezing,
        # dynamo treats parameters as constants and guards each layer's by identity.
        inductor_config.freezing = False
        self.layers = list(model.model.layers)
        # What nn.Module.compile installs, kept aside until active() puts it in place.
        self._fns = [torch.compile(layer._call_impl, fullgraph=True) for layer in self.layers]

    @contextmanager
    def active(self) -> Iterator[None]:
        for layer, fn in zip(self.layers, self._fns, strict=True):
            layer._compiled_call_impl = fn
        try:
            yield
        finally:
            for layer in self.layers:
                layer._compiled_call_impl = None

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            with self.active():
                return fn(*args, **kwargs)

        return run


def compile_step(fn: Callable[..., Any], model: Any, mode: str, device: Any) -> Callable[..., Any]:
    """A compiled fixed-shape step of ``model`` (a verify or draft forward). ``regional``: its
    layers compiled, and on CUDA the step captured by ``CapturedStep``, keyed by the model's KV
    cache; other modes: ``compile_fn``. Callers mark a step's start
    (``torch.compiler.cudagraph_mark_step_begin``) for the reduce-overhead graphs."""
    if mode != "regional":
        return compile_fn(fn, mode)
    step = CompiledLayers(model).wrap(fn)
    import torch

    if torch.device(device).type != "cuda":
        return step
    from llmopt.engine.cuda_graph import CapturedStep, kv_cache_key

    return CapturedStep(step, key=functools.partial(kv_cache_key, model))
