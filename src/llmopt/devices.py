"""Device and dtype resolution (the one place that names CUDA for the generic code paths)."""

from __future__ import annotations

import gc
import sys
import weakref

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


# Every CUDA graph llmopt captures, so that a tensor-parallel rank can destroy them before it
# tears down NCCL: a graph that captured a collective holds a reference on its communicator, and
# ncclCommDestroy waits for that reference to go (pytorch/pytorch#115388), so a rank that still
# holds its graphs never leaves the group (bench/results/tp/h200x2_s11a/tests.log).
_GRAPHS: weakref.WeakSet[torch.cuda.CUDAGraph] = weakref.WeakSet()


def new_cuda_graph() -> torch.cuda.CUDAGraph:
    """A CUDA graph to capture into, registered for ``release_cuda_graphs``."""
    graph = torch.cuda.CUDAGraph()
    _GRAPHS.add(graph)
    return graph


def release_cuda_graphs() -> int:
    """Destroy every captured CUDA graph of this process: llmopt's own (``new_cuda_graph``) and
    torch.compile's cudagraph trees. Their owners cannot replay them afterwards; meant for the
    shutdown. Returns how many of llmopt's own graphs were live."""
    graphs = list(_GRAPHS)
    for graph in graphs:
        graph.reset()
    _GRAPHS.clear()
    trees = sys.modules.get("torch._inductor.cudagraph_trees")  # only if compile ever loaded it
    if trees is not None:
        trees.reset_cudagraph_trees()
    gc.collect()  # graphs held only by reference cycles go now, not at interpreter exit
    return len(graphs)


class HostTokens:
    """One non-blocking device->host copy of a step's tokens, waited for only when read."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.event: torch.cuda.Event | None = None
        if tokens.device.type == "cuda":
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tokens

    def get(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    import statistics
    import time

    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
