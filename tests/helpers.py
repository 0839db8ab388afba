"""Tiny Hugging Face reference models for the tests (transformers is a test dependency only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_BASE: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
)

# name -> (transformers config class name, overrides)
TINY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama2": ("LlamaConfig", {}),
    "llama3-gqa-rope-scaling": ("LlamaConfig", {
        "num_key_value_heads": 2, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }),
    "mistral-gqa-window": ("MistralConfig", {"num_key_value_heads": 1, "sliding_window": 8}),
    "qwen2-qkv-bias": ("Qwen2Config", {"num_key_value_heads": 2}),
    "smollm2-tied": ("LlamaConfig", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "llama-linear-rope": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
}


def sharp_int4_tiny(device: str | torch.device, dtype: torch.dtype, spec: str) -> Any:
    """The tiny preset widened to shapes torch's int4 kernels take (256 wide, head dim 64), its
    head sharpened so greedy choices sit far from ties, quantised with ``spec`` (calibrated
    methods on seeded random token ids)."""
    from llmopt.loading.loader import random_model
    from llmopt.loading.presets import preset_config
    from llmopt.quant import quantize_
    from llmopt.quant.api import parse_quant_spec

    cfg = preset_config("tiny").replace(hidden_size=256, intermediate_size=512, head_dim=64)
    model = random_model(cfg, torch.device(device), dtype, seed=5)
    model.lm_head.weight.mul_(40.0)
    config = parse_quant_spec(spec)
    calib = None
    if config.needs_calibration:
        calib = torch.randint(0, cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    return quantize_(model, config, calibration=calib)


def assert_greedy_up_to_ties(model: Any, prompt: list[int], tokens: list[int], tol: float = 0.1) -> None:
    """``tokens``, a greedy continuation of ``prompt`` from another run of ``model`` (other
    kernels, sums split or ordered otherwise: the same model up to rounding), are ``model``'s own
    greedy choices up to near ties: teacher-forced through ``model`` eagerly, each one's logit is
    within ``tol`` standard deviations of that position's logits of the best. Exact token
    equality would ask rounding to agree: with float atomics in split-K kernels it need not even
    agree between two runs of one kernel, and one flipped near tie changes every later token.
    A wrong kernel gives gaps of whole standard deviations."""
    model.clear_caches()
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt + tokens[:-1]], device=dev)
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:].float()  # [len(tokens), V]
    picked = logits.gather(-1, torch.tensor(tokens, device=dev)[:, None])[:, 0]
    gaps = (logits.max(-1).values - picked) / logits.std(-1)
    worst = int(gaps.argmax())
    assert gaps[worst].item() <= tol, f"token {worst} ({tokens[worst]}) is {gaps[worst].item():.3f} std below the best"


def make_hf_model(variant: str, seed: int = 0) -> Any:
    import transformers

    cls_name, overrides = TINY_VARIANTS[variant]
    cfg_cls = getattr(transformers, cls_name)
    kwargs = {**TINY_BASE, **overrides}
    if cls_name != "LlamaConfig":
        kwargs.pop("mlp_bias", None)
    cfg = cfg_cls(**kwargs)
    if cls_name == "Qwen2Config":
        cfg.use_sliding_window = False
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # transformers initialises with std 0.02: widen it so logits are not all near-equal.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2 if "embed" in name or "lm_head" in name else 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
            else:
                p.uniform_(0.8, 1.2)
    return model.eval()


def save_hf_model(variant: str, out: Path, seed: int = 0) -> Any:
    model = make_hf_model(variant, seed)
    model.save_pretrained(out)
    return model


def run_triton_script(script: str, tmp_path: Path, interpret: bool) -> None:
    """Run ``script`` (Python source) in a fresh interpreter with this tests folder as its argv[1]:
    under Triton's CPU interpreter when ``interpret`` (no GPU visible), else as is (e.g. compiling
    for a GPU target without one). Skips the calling test without triton; fails on a non-zero exit."""
    import importlib.util
    import os
    import subprocess
    import sys

    import pytest

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    path = tmp_path / "triton_script.py"
    path.write_text(script)
    here = Path(__file__).parent
    # The repository root on the path too: test modules the script imports import ``tests.*``.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    if interpret:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(path), str(here)], capture_output=True,
                       text=True, timeout=900, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])


def map_on_every_core(fn: Any, items: list[Any]) -> list[Any]:
    """``fn`` over ``items``, in order, in forked workers (one per core, at most 4): for the Triton
    scripts that ``run_triton_script`` runs, whose compiles and interpreted launches are
    independent. A script calls ``torch.set_num_threads(1)`` before any tensor work, so that no
    OpenMP team exists across the fork."""
    import multiprocessing
    import os

    with multiprocessing.get_context("fork").Pool(min(4, os.cpu_count() or 1)) as pool:
        return pool.map(fn, items, chunksize=1)


def ptxas_spills(ptx: str) -> str | None:
    """The end of ptxas's report when this PTX fails to assemble for sm_90a or spills registers;
    None when it assembles without spills."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90)
    ptxas = getattr(ptxas, "path", ptxas)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                           capture_output=True, text=True)
    m = re.search(r"(\d+) bytes spill stores", r.stderr)
    return r.stderr[-300:] if r.returncode != 0 or (m and int(m.group(1)) > 0) else None
