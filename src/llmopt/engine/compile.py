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
PDL_CHOICES = ("auto", "1", "0")  # LLMOPT_PDL (``use_pdl``)
RECOMPILE_LIMIT = 64  # compiled entries per code object (``configure_inductor``)
TP_TUNING_CHOICES = ("heuristic", "timed")  # LLMOPT_TP_TUNING (``same_kernels_on_every_rank``)


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

    return "regional" if torch.device(device).type == "cuda" and not _sharded() else "reduce-overhead"


def configure_inductor() -> None:
    global _configured
    if _configured:
        return
    root = cache_dir() / "compile"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    import torch._inductor.config as inductor_config

    from llmopt.errors import env_choice

    # Generated-kernel settings, each "1" (default) or "0", measured on an H200 (7B bf16, batch 1,
    # regional compile; bench/results/decode/h200_s9_*):
    # - LLMOPT_COORDINATE_DESCENT: inductor tunes each kernel's block sizes by timing neighbours of
    #   its heuristic config (``coordinate_descent_tuning``).
    # - LLMOPT_AUTOTUNE_POINTWISE: the wider search over reduction and pointwise configs
    #   (``max_autotune_pointwise``), which is where every batch-1 matmul lands: 242.7 tok/s
    #   against 221.2 (one compile each), for a longer cold compile; about neutral next to the
    #   weight-only kernels (int8 286.5 against 283.8, int4-g128 334.1 against 335.4).
    # (LLMOPT_PDL is per compiled model: ``inductor_options``.)
    on = ("1", "0")
    inductor_config.fx_graph_cache = True
    inductor_config.coordinate_descent_tuning = env_choice("LLMOPT_COORDINATE_DESCENT", "1", on) == "1"
    inductor_config.max_autotune_pointwise = env_choice("LLMOPT_AUTOTUNE_POINTWISE", "1", on) == "1"
    env_choice("LLMOPT_PDL", "auto", PDL_CHOICES)  # read per model (use_pdl); checked on every compile
    env_choice("LLMOPT_TP_TUNING", "heuristic", TP_TUNING_CHOICES)  # same_kernels_on_every_rank
    inductor_config.triton.unique_kernel_names = True
    # The regional compile wraps every layer's ``_call_impl``, one code object shared by every
    # module: each model compiled in a process (a quantised one and its reference, a draft, a
    # test session) adds an entry under it, and with fullgraph=True dynamo's default limit of 8
    # is a hard failure at the ninth.
    import torch._dynamo.config as dynamo_config

    if hasattr(dynamo_config, "recompile_limit"):
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = True
    _configured = True
    log.info("inductor cache at %s", os.environ["TORCHINDUCTOR_CACHE_DIR"])


def _has_opaque_kernels(model: Any) -> bool:
    """Whether ``model``'s linears run kernels inductor does not generate: the weight-only
    quantised formats and ``--dense-gemv``'s one-row kernel."""
    from llmopt.models.gemv_linear import GemvLinear
    from llmopt.quant.linear import QuantLinear

    return any(isinstance(m, (QuantLinear, GemvLinear)) for m in model.modules())


def use_pdl(model: Any) -> bool:
    """LLMOPT_PDL: programmatic dependent launch for the kernels inductor generates (Hopper and
    later; ``triton.enable_pdl``). Each is launched while the kernel before it still runs and waits
    on the device (``gdc_wait``) only before reading what came before, so the launch and ramp-up of
    the next batch-1 matmul hide behind the drain of the last. Measured on one H200 (7B, batch 1,
    regional; bench/results/decode/h200_s9b_*): bf16 with PDL and LLMOPT_AUTOTUNE_POINTWISE,
    234.8-254.7 tok/s over four compiles (median 241.2), against 216.3-231.4 over three (median
    227.0) with neither. Next to kernels inductor does not generate, which are not PDL launches,
    it lost: int4-g128 325.3 against 334.1, int8 279.6 against 286.5. So ``auto`` (default) turns
    it on only for models without them, or where ``kernel_pdl(model)`` makes llmopt's own kernels
    PDL launches too (torch's int4 kernel, tinygemm, never is); "1" and "0" force it."""
    from llmopt.errors import env_choice

    choice = env_choice("LLMOPT_PDL", "auto", PDL_CHOICES)
    if choice != "auto" or model is None:
        return choice == "1"
    return kernel_pdl(model) or not _has_opaque_kernels(model)


def kernel_pdl(model: Any) -> bool:
    """LLMOPT_KERNEL_PDL for a compile of ``model``: whether llmopt's own decode kernels run as
    programmatic dependent launches. "1" and "0" force it. ``auto`` (default) turns it on where
    it measured faster: on one Hopper-or-later GPU, for models whose weight-only linears are all
    int8 per channel or fp8 (weight-only), the formats with the row-major one-row kernel. 7B,
    batch 1, fused projections, on and off on the same H200 (bench/results/decode/h200_s12*):
    int8 348.0 tok/s against 318.2 and 329.0 against 311.4 on a second machine, fp8 363.6
    against 342.7 and 343.3 against 334.1. Elsewhere it lost or did not gain: nf4 276.1 against
    288.4, int4 (torch's tinygemm, never a PDL launch) 332.2 against 357.9 to 370.5, bf16 at
    80.9% of roofline against 80.7%. With the packed formats' PDL op returning float32 sums
    (thirteenth session, h200_s13a and h200x2_s13b), nf4 and int4 pairs split both ways within
    the run-to-run spread (nf4 281.0 against 288.9 and 303.6 against 285.4), so they stay off.
    Unquantised models whose o_proj and down_proj take llmopt's one-row kernel (``--dense-gemv``,
    by default on one Hopper GPU) turn it on too: measured only that way (fourteenth session,
    h200_s14*), and with those kernels not PDL launches inductor's would be off (``use_pdl``)."""
    from llmopt.errors import env_choice
    from llmopt.kernels import KERNEL_PDL_CHOICES

    choice = env_choice("LLMOPT_KERNEL_PDL", "auto", KERNEL_PDL_CHOICES)
    if choice != "auto":
        return choice == "1"
    param = next(model.parameters(), None) if model is not None else None
    return param is not None and one_hopper_gpu(param.device) and _row_major_one_row_formats(model)


def one_hopper_gpu(device: Any) -> bool:
    """Whether ``device`` is an NVIDIA GPU of compute capability 9.0 or later and this process
    is not one rank of a tensor-parallel group: where the auto rules that turn on llmopt's PDL
    launches (NVIDIA PTX) and its one-row kernel for unquantised layers were measured. A ROCm
    build's "9.x" is not Hopper."""
    import torch

    if device.type != "cuda" or _sharded() or torch.version.hip:
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _row_major_one_row_formats(model: Any) -> bool:
    """Whether every linear of ``model`` that runs llmopt's kernels is int8 per channel,
    weight-only fp8 or a swapped plain one (``GemvLinear``), and there is one (the models
    ``kernel_pdl`` turns PDL on for)."""
    from llmopt.models.gemv_linear import GemvLinear
    from llmopt.quant.linear import FP8Linear, Int8Linear, QuantLinear

    quantised = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not quantised:
        return any(isinstance(m, GemvLinear) for m in model.modules())
    return all(
        (type(m) is Int8Linear and not m.group_size) or (type(m) is FP8Linear and m.mode == "dequant")
        for m in quantised)


def _sharded() -> bool:
    """Whether this process is one rank of a tensor-parallel group of more than one."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _tp_on_gpus() -> bool:
    """Whether this process is one rank of a tensor-parallel group on GPUs (NCCL)."""
    import torch.distributed as dist

    return _sharded() and dist.get_backend() == "nccl"


def same_kernels_on_every_rank() -> bool:
    """LLMOPT_TP_TUNING: how a tensor-parallel rank picks its generated kernels' configs.
    ``heuristic`` (default): inductor's deterministic mode, configs chosen without timing them,
    so every rank runs the same kernels. ``timed``: each rank times candidates on its own GPU
    while all compile at once, and picks its own; every all-reduce then waits for the slowest
    rank's choice. Measured on 2 H200s (bench/results/tp/h200x2_s10a_*, regional, one-shot
    all-reduce): 13B TP=2 217.0 tok/s heuristic against 214.0 timed, the one-shot all-reduce
    143.8 ms against 167.1 ms of rank 0's profiled run (time spent waiting for the other rank);
    70B TP=2 50.5 and 48.0 tok/s heuristic on two machines (44.1 in the seventh session). One
    GPU keeps the timed search (there it measured faster: 7B 251.7 against 246.3, int8 238.0
    against 205.7; bench/results/decode/h200x2_s10c)."""
    from llmopt.errors import env_choice

    return env_choice("LLMOPT_TP_TUNING", "heuristic", TP_TUNING_CHOICES) == "heuristic" and _tp_on_gpus()


@contextmanager
def kernels_launched_for(on: bool) -> Iterator[None]:
    """``llmopt.kernels.KERNEL_PDL`` set to ``on`` inside: the compiled callables of a model run
    under their model's ``kernel_pdl``, so its kernels are traced as PDL launches or not by that
    model's formats, whatever another compiled model in the process (a draft) asks for. Dynamo
    guards on the flag, so each compiled graph sees the value it was traced with; outside,
    eager code keeps the LLMOPT_KERNEL_PDL setting."""
    import llmopt.kernels

    prev = llmopt.kernels.KERNEL_PDL
    llmopt.kernels.KERNEL_PDL = on
    try:
        yield
    finally:
        llmopt.kernels.KERNEL_PDL = prev


def inductor_options(model: Any, mode: str | None = None) -> dict[str, Any]:
    """Per-compile inductor settings (``torch.compile(options=...)``): those of ``mode`` (which
    ``options`` replaces), programmatic dependent launch where ``use_pdl(model)``, and under
    tensor parallelism on GPUs the untimed kernel choice of ``same_kernels_on_every_rank``. On
    torch builds without ``triton.enable_pdl`` (or ``deterministic``) the setting is left out."""
    import torch._inductor
    import torch._inductor.config as inductor_config

    opts = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
    if hasattr(inductor_config.triton, "enable_pdl"):
        opts["triton.enable_pdl"] = use_pdl(model)
    if hasattr(inductor_config, "deterministic") and same_kernels_on_every_rank():
        opts["deterministic"] = True
        # also for the tuning that runs at a kernel's first launch, outside this compile's
        # settings (the process is one rank: nothing else compiles in it)
        inductor_config.deterministic = True
    return opts


def inductor_settings(model: Any) -> dict[str, bool]:
    """The generated-kernel settings a compile of ``model`` runs with, for benchmark records."""
    import torch._inductor.config as inductor_config

    configure_inductor()
    return {
        "pdl": hasattr(inductor_config.triton, "enable_pdl") and use_pdl(model),
        "kernel_pdl": kernel_pdl(model),
        "same_kernels_on_every_rank": same_kernels_on_every_rank(),
        "autotune_pointwise": bool(inductor_config.max_autotune_pointwise),
        "coordinate_descent": bool(inductor_config.coordinate_descent_tuning),
    }


def compile_fn(
    fn: Callable[..., Any], mode: str = "reduce-overhead", dynamic: bool = False, device: Any = None,
    model: Any = None,
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
    # ``model``: what ``fn`` runs, for the per-model settings of ``inductor_options``
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, options=inductor_options(model, mode))
    pdl = kernel_pdl(model)

    def run(*args: Any, **kwargs: Any) -> Any:
        with kernels_launched_for(pdl):
            return compiled(*args, **kwargs)

    return run


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
        opts = inductor_options(model)
        self._fns = [torch.compile(layer._call_impl, fullgraph=True, options=opts) for layer in self.layers]
        self.kernel_pdl = kernel_pdl(model)

    @contextmanager
    def active(self) -> Iterator[None]:
        for layer, fn in zip(self.layers, self._fns, strict=True):
            layer._compiled_call_impl = fn
        try:
            with kernels_launched_for(self.kernel_pdl):
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
        return compile_fn(fn, mode, model=model)
    step = CompiledLayers(model).wrap(fn)
    import torch

    if torch.device(device).type != "cuda":
        return step
    from llmopt.engine.cuda_graph import CapturedStep, kv_cache_key

    return CapturedStep(step, key=functools.partial(kv_cache_key, model))
