"""torch.compile settings, in one place. The compile caches live under the llmopt cache dir, so a
second process on the same machine starts from compiled artefacts instead of from scratch."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from llmopt.loading.resolve import cache_dir

log = logging.getLogger(__name__)

COMPILE_MODES = ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "default")
_configured = False


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


def compile_fn(fn: Callable[..., Any], mode: str = "reduce-overhead", dynamic: bool = False) -> Callable[..., Any]:
    from llmopt.errors import UserError

    if mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {mode!r}; known: {', '.join(COMPILE_MODES)}")
    configure_inductor()
    import torch

    return torch.compile(fn, mode=None if mode == "default" else mode, fullgraph=True, dynamic=dynamic)
