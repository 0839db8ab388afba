"""Device and dtype resolution (the one place that names CUDA for the generic code paths)."""

from __future__ import annotations

import torch

from llmopt.errors import UserError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} was asked for but CUDA is not available on this machine")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {spec!r} does not exist ({torch.cuda.device_count()} GPU(s) present)")
        return dev
    if spec == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def resolve_dtype(spec: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(spec, torch.dtype):
        return spec
    spec = spec.strip().lower()
    if spec == "auto":
        # bf16 halves the bytes read per token on GPUs; CPUs without bf16 units run float32 faster.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in _DTYPES:
        raise UserError(f"unknown dtype {spec!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[spec]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
