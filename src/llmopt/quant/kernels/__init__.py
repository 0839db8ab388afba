"""Weight-only quantised matmuls: one function per format, dispatching by device and batch.

- CPU, more than ``SMALL_M`` rows, and nf4/fp8 at any size: the plain-PyTorch path in
  ``reference.py`` (dequantise, or scale after the matmul where that is exact).
- CPU, at most ``SMALL_M`` rows: ``torch._weight_int8pack_mm`` for int8 and
  ``torch._weight_int4pack_mm_for_cpu`` for int4 (``Int4Linear`` prepacks the codes, padding a
  ragged K to whole groups), which are faster there (timings next to each call).
- CUDA, at most ``SMALL_M`` rows (decode, batch 1..16): int4 with bf16 activations goes to torch's
  int4 GEMM (``torch._weight_int4pack_mm``, "tinygemm"), measured fastest on an H200 (7B g128:
  337.4 tok/s against 150.3 with the Triton kernel, bench/results/decode/h200_s5*); other
  formats (and int4 shapes tinygemm does not take) use the fused Triton dequantise-and-matmul
  in ``triton_wo.py``, which reads the packed weight once: at one row, the one-row kernels for
  the formats where they measured faster (``AUTO_ONE_ROW``).
- CUDA, more rows (prefill): dequantise to the activation dtype and use cuBLAS. The dequantise is
  paid once per call and is small next to an M x N x K matmul with large M.
- FP8 with ``mode="scaled_mm"``: activations quantised per row to e4m3 and ``torch._scaled_mm``
  (H100 FP8 tensor cores) at any batch.

Triton is imported only when a CUDA tensor reaches a Triton path, so the CPU paths never need it.
"""

from __future__ import annotations

import importlib.util

import torch

from llmopt.errors import env_choice
from llmopt.kernels import KERNEL_PDL  # noqa: F401  (read and checked at import, as the settings below)
from llmopt.quant.kernels import reference as ref

SMALL_M = 16


KERNEL_CHOICES = ("auto", "tinygemm", "triton", "torch", "triton-gemv", "mma")

# What ``auto`` sends down the one-row Triton kernels (``triton_wo.gemv``) at batch 1, chosen by
# measurement on an H200 (Llama-2-7B, whole model, compiled; bench/results/decode/h200_s6a_*,
# h200x2_s8_*): int8 292.3 tok/s against 256.8 with the tiled Triton kernel, fp8 298.6 against
# 233.6, nf4 135.0 against 54.1, int8-g32 165.7 against 98.5, int4 shapes tinygemm does not
# take 284.5 against 150.3 (where tinygemm fits it stays faster: 337.4 at int4-g128).
AUTO_ONE_ROW = frozenset({"int4", "int8", "int8g", "nf4", "fp8"})
GEMV_MAX_ROWS = 8  # the most input rows the few-row kernels (triton_wo.gemv) take


# Settings of the Triton decode kernels (``triton_wo.py``), read and checked here at import so that
# a bad value is caught on any machine before a model runs, not inside a compiled forward on the
# GPU. Measured in the whole 7B model on an H200 (bench/results/decode/h200x2_s8_*):
# - LLMOPT_GEMV_ONE_ROW, which kernels take a single quantised row: "deferred" (default) the
#   one-row kernels ``_packed_gemv1`` and ``_rowmajor_gemv1``, which keep per-position partial
#   sums and reduce once (every format but int8-gN, which stays on the few-row kernel); "reduce"
#   the few-row kernels, which sum each tile as they go. int8 292.3 tok/s against 284.6, fp8
#   298.6 against 251.8, nf4 135.0 against 99.8. Unquantised rows take the few-row kernel unless
#   ``gemv(one_row="deferred")`` asks, as ``--dense-gemv``'s modules do by default
#   (LLMOPT_DENSE_ONE_ROW, ``models.gemv_linear``).
# - LLMOPT_INT_DECODE, how the deferred kernels turn integer codes into floats: "magic" (default)
#   the exponent trick (``triton_wo._nibble_float``), int8 292.3 tok/s; "cvt" a conversion
#   instruction, 204.8. The values are the kernels' INT_DECODE constants.
# - LLMOPT_NF4_DECODE, how NF4 codes become levels in the deferred kernel: "prmt" (default)
#   decodes all eight codes of a word by byte permutes from two 16-byte tables (the levels'
#   bfloat16 high and low bytes; ``triton_wo._nf4_prmt``), no memory access: 256.1 tok/s against
#   139.6 (7B, one H200, h200_s11d). In SASS (sm_90, a 64 x 256 tile) about as many instructions
#   per loop iteration as the codebook (1,032 against 1,064), but none of its 128 gathers. "lut"
#   loads each weight's level from the 16-entry codebook, a gather of up to 16 addresses per warp
#   for every weight; "select" picks it by a tree of 15 selects on the code's four bits
#   (``_nf4_select``), about 10 selects per weight: 112.8 against 135.0 for "lut". The few-row
#   kernel takes "select" at one row and uses "lut" otherwise (with 8 rows' accumulators live the
#   tree spills on sm_90).
# - LLMOPT_GEMV_PREFETCH, "auto" (default), "1" or "0": the one-row kernels issue the next tile's
#   weight loads before computing on the current one (``triton_wo._packed_gemv1``'s PREFETCH). In
#   SASS (sm_90) an int4 tile costs about 600 instructions per thread per iteration, so without it
#   each iteration waits out a load's latency and then computes, with about 8 warps per SM to
#   cover the wait (N = 4096: 256 programs of 4 warps). Measured in the 7B model on one H200
#   (bench/results/decode/h200_s14*): it lost in every quantised format whose one-row kernel
#   runs (int8 266.1 tok/s against 316.8, fp8 296.4 against 336.6, nf4 259.0 against 269.0) and
#   won for unquantised rows (``--dense-gemv out``: 254.4 against 249.3, 241.7 against 237.1,
#   223.9 against 219.8 at a 4,096-token context), so ``auto`` prefetches FMT_DENSE rows only.
INT_DECODES = {"cvt": 0, "magic": 1}
NF4_DECODES = {"lut": 0, "select": 1, "prmt": 2}  # the deferred kernel's NF4_DECODE constants
ONE_ROW = env_choice("LLMOPT_GEMV_ONE_ROW", "deferred", ("deferred", "reduce"))
INT_DECODE = env_choice("LLMOPT_INT_DECODE", "magic", tuple(INT_DECODES))
NF4_DECODE = env_choice("LLMOPT_NF4_DECODE", "prmt", tuple(NF4_DECODES))
# None (auto): FMT_DENSE rows only
GEMV_PREFETCH = {"auto": None, "1": True, "0": False}[env_choice("LLMOPT_GEMV_PREFETCH", "auto", ("auto", "1", "0"))]
# - LLMOPT_GEMV_STAGES, "auto" (default), "0", "3", "4" or "5": the one-row kernels' loop over K
#   as a software pipeline of that many stages (``tl.range(num_stages=...)``): Triton copies the
#   next tiles' codes, scales and zeros into shared memory asynchronously (cp.async) while the
#   warp decodes the current one, so several tiles are in flight per program without holding them
#   in registers (PREFETCH's cost). "0": the plain loop. Compiled for sm_90 it keeps the plain
#   loop's registers (72 for an int4 tile of 64 x 256) and adds 8-16 KB of shared memory per
#   stage. "auto": 3 stages for the row-major kernel (int8, fp8: 11-18% less time per call on
#   an H200; Llama-2-7B decode on two machines int8 329.4 -> 355.5 and 340.6 -> 382.6 tok/s, fp8
#   343.5 -> 372.1 and 362.0 -> 402.7) and the plain loop for the packed 4-bit one (int4, nf4:
#   2-5% slower with 3 stages, 5-15% with 5; docs/benchmarks.md, twenty-first session).
#   Unquantised rows keep PREFETCH, which comes first in the kernel.
_stages = env_choice("LLMOPT_GEMV_STAGES", "auto", ("auto", "0", "3", "4", "5"))
# stages per one-row kernel: "packed" (int4, nf4) and "rowmajor" (int8, fp8, unquantised rows)
GEMV_STAGES = {"packed": 0, "rowmajor": 3} if _stages == "auto" else {"packed": int(_stages), "rowmajor": int(_stages)}


def gpu_kernel_choice() -> str:
    """``LLMOPT_WO_KERNEL`` picks the CUDA decode path, so the benchmark can choose by measurement:
    ``auto`` (default) is the measured-best path per format: int4 through torch's CUDA int4 GEMM
    (``torch._weight_int4pack_mm``, "tinygemm", the kernel gpt-fast uses; weights repacked at load
    by ``Int4Linear.prepare_for_device``), the other formats (and int4 shapes tinygemm does not
    take) through the one-row Triton kernels at batch 1 and the tiled Triton kernel at 2-16
    rows. ``tinygemm`` is int4 through tinygemm and every other format through the tiled
    Triton kernel; ``triton`` sends every format to the tiled kernels in ``triton_wo.py``;
    ``triton-gemv`` every format at 1 to 8 rows to ``triton_wo.gemv`` (no padded tl.dot rows,
    large tiles along K, each weight tile decoded once for all rows; not measured above one row)
    and everything else to ``triton``; ``torch`` the plain-PyTorch path, which torch.compile
    fuses (dequantise inside inductor's GEMV). ``auto`` sends int4 at 4 to 16 rows with groups
    of 128 or more, at 8 to 16 with groups of 64, and NF4 (single-level absmax, blocks of 64 or
    more) at 2 to 16 (batched decode), to the tensor-core kernel (``triton_int4_mma.py``;
    ``mma_min_rows``) where the shape fits it; ``mma`` sends int4 and
    NF4 (single-level absmax) there at 1 to 16 rows, every group size."""
    return env_choice("LLMOPT_WO_KERNEL", "auto", KERNEL_CHOICES)


def gemv_rows(choice: str, fmt: str) -> int:
    """The most input rows a kernel choice sends to the few-row kernels for one format (0: none)."""
    if choice == "triton-gemv":
        return GEMV_MAX_ROWS
    return 1 if choice == "auto" and fmt in AUTO_ONE_ROW else 0


# Decided once at import: forward() runs under torch.compile, which cannot trace
# importlib or os.environ lookups (dynamo refuses find_spec as a skipped function).
_CHOICE = gpu_kernel_choice()
_TRITON_OK = importlib.util.find_spec("triton") is not None and _CHOICE != "torch"
_GEMV_ROWS = {f: gemv_rows(_CHOICE, f) for f in ("int8", "int8g", "int4", "nf4", "fp8")}
_TINYGEMM = _CHOICE in ("auto", "tinygemm", "mma") and hasattr(torch, "_weight_int4pack_mm")
TINYGEMM_INNER_K_TILES = 8  # torch's tile parameter (2, 4 or 8); K must be a multiple of 16 * 8


def tinygemm_fits(in_features: int, out_features: int, group_size: int) -> bool:
    """Shapes torch's CUDA int4 kernel takes: whole groups of 32-256, K a multiple of 128, N of 8."""
    return (group_size in (32, 64, 128, 256) and in_features % group_size == 0
            and in_features % (16 * TINYGEMM_INNER_K_TILES) == 0 and out_features % 8 == 0)


def use_tinygemm_for(x: torch.Tensor) -> bool:
    return (_TINYGEMM and x.device.type == "cuda" and x.dtype == torch.bfloat16
            and x.numel() // x.shape[-1] <= SMALL_M)


# Rows from which int4 goes to the tensor-core kernel (``triton_int4_mma``), by group size; 0:
# never. Measured on an H200 (7B layer shapes, bench/results/decode/h200_s16*/int4_mma.json)
# against tinygemm, per layer's four matmuls (q/k/v and gate/up fused): g128 lost at one and
# two rows (0.9-1.4 TB/s against 1.2-1.8), won at four (82.8 us against 87.3), eight (1.1-1.4
# TB/s against 0.67-0.80) and sixteen (0.81-0.96 against 0.40-0.51); g64 lost at four (97.0 us
# against 88.6) and won at eight (121.1 against 141.1); at g32 eight rows' columns leave it
# one-chunk tiles, with which it tied or lost (0.55-0.92 TB/s against 0.71-0.88).
# NF4 (blocks of 64 and more) from two rows: its one-row kernel covers a single row only, and more
# rows otherwise take the tiled dequantise-and-dot kernel. At 8 rows that kernel streamed 0.18-0.21
# TB/s against 0.68-1.14 for the tensor-core one, and 7B decoded 55.1 tok/s per sequence against
# 235.1 (bench/results/decode/h200_s17a); at one row the two tie (0.76-1.38 TB/s against
# 0.80-1.44), so the one-row kernel keeps it.
# Per format, group size -> rows; a group size takes the entry of the largest size it reaches.
_MMA_MIN_ROWS_AUTO = {"int4": {128: 4, 64: 8}, "nf4": {64: 2}}


# LLMOPT_WO_BATCH_COPY=0 keeps ``auto`` off the tensor-core kernel, so that 4-bit modules hold
# no second copy of their codes on the GPU (7B: 3.4 GB; NF4 then weighs 7.3 GB at batch 8
# instead of 10.7): batch-1 decode runs the same kernels either way, batched decode slower.
_BATCH_COPY = env_choice("LLMOPT_WO_BATCH_COPY", "1", ("1", "0")) == "1"


def mma_min_rows(group_size: int, fmt: str = "int4") -> int:
    """The fewest rows sent to the tensor-core kernel for this format ("int4" or "nf4") and
    group size (0: none)."""
    if _CHOICE == "mma":
        return 1
    if _CHOICE != "auto" or not _BATCH_COPY:
        return 0
    reached = [g for g in _MMA_MIN_ROWS_AUTO[fmt] if g <= group_size]
    return _MMA_MIN_ROWS_AUTO[fmt][max(reached)] if reached else 0


MMA_CHUNK = 128  # k per chunk of the tensor-core layout: its bytes hold 64 low and 64 high codes


def mma_layout_fits(in_features: int, group_size: int) -> bool:
    """Shapes the tensor-core kernel's layout holds: K in whole chunks (``MMA_CHUNK``), groups of
    a power of two from 16 on (so that groups and tiles nest)."""
    return in_features % MMA_CHUNK == 0 and group_size >= 16 and group_size & (group_size - 1) == 0


def mma_wanted(group_size: int, fmt: str = "int4") -> bool:
    """Whether an ``Int4Linear`` (``NF4Linear``: fmt "nf4") with these groups should hold the
    tensor-core kernel's layout on CUDA."""
    return _TRITON_OK and mma_min_rows(group_size, fmt) > 0


def use_mma_for(x: torch.Tensor, group_size: int, fmt: str = "int4") -> bool:
    """x goes to the tensor-core int4 kernel: CUDA, bfloat16 or float16, a row count from
    ``mma_min_rows`` on that the kernel's columns hold (``triton_int4_mma.fits``)."""
    least = mma_min_rows(group_size, fmt)
    if not (least and x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    rows = x.numel() // x.shape[-1]
    if not least <= rows <= SMALL_M:
        return False
    from llmopt.quant.kernels.triton_int4_mma import fits

    return fits(rows, x.shape[-1], group_size)


def _use_triton(x: torch.Tensor) -> bool:
    # float32 activations would make tl.dot run in tf32: keep those on the exact path.
    return (_TRITON_OK and x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)
            and x.numel() // x.shape[-1] <= SMALL_M)


def _cpu_small(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() // x.shape[-1] <= SMALL_M


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if _use_triton(x):
        from llmopt.quant.kernels.triton_wo import int8_matmul

        y = int8_matmul(x, qweight, scales, gemv_rows=_GEMV_ROWS["int8"])
        return y if bias is None else y + bias
    if _cpu_small(x) and hasattr(torch, "_weight_int8pack_mm"):
        # CPU decode: torch's int8 GEMV is 1.35x (fp32) to 10x (bf16) faster than the float
        # matmul at 1 row (1536x576, one thread); at prefill sizes it is far slower (14x at
        # 1024 rows), so longer inputs take the reference path.
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch._weight_int8pack_mm(x2, qweight, scales.to(x.dtype)).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    return ref.int8_linear_ref(x, qweight, scales, bias)


def int8g_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-wise asymmetric int8 (``int8-gN``): Triton on CUDA at decode sizes, else dequantise
    and matmul (on CPU, torch.compile fuses the dequantise into its GEMV)."""
    if _use_triton(x):
        from llmopt.quant.kernels.triton_wo import int8g_matmul

        y = int8g_matmul(x, qweight, scales, zeros, group_size, gemv_rows=_GEMV_ROWS["int8g"])
        return y if bias is None else y + bias
    return ref.int8g_linear_ref(x, qweight, scales, zeros, group_size, bias)


def int4_linear_cpu_packed(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """CPU decode through ``torch._weight_int4pack_mm_for_cpu`` (weights prepacked by
    ``Int4Linear``): 2.6x (fp32) to 75x (bf16) faster than dequantise-then-matmul at one row
    (1536x576, g64, one thread), but 40x slower at 256 rows in fp32, hence decode sizes only."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_zeros.to(x.dtype))
    y = y.reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def int4_linear_tinygemm(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """CUDA decode through ``torch._weight_int4pack_mm`` (bf16 activations; ``packed`` and
    ``scales_zeros`` [G, N, 2] from ``Int4Linear.prepare_for_device``)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch._weight_int4pack_mm(x2, packed, group_size, scales_zeros).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def int4_linear_mma(
    x: torch.Tensor, packed: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor, group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """CUDA decode through the tensor-core kernel (``triton_int4_mma``; its layout built by
    ``Int4Linear.prepare_for_device``)."""
    from llmopt.quant.kernels.triton_int4_mma import int4_mma

    y = int4_mma(x, packed, scales_t, zeros_t, group_size)
    return y if bias is None else y + bias


def nf4_linear_mma(
    x: torch.Tensor, packed: torch.Tensor, absmax_t: torch.Tensor, block_size: int, lut: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """CUDA decode of NF4 through the tensor-core kernel (2 to 16 rows under ``auto``, every
    decode size under ``LLMOPT_WO_KERNEL=mma``; layout built by ``NF4Linear.prepare_for_device``)."""
    from llmopt.quant.kernels.triton_int4_mma import nf4_mma

    y = nf4_mma(x, packed, absmax_t, block_size, lut)
    return y if bias is None else y + bias


def int4_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    group_size: int, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if _use_triton(x):
        from llmopt.quant.kernels.triton_wo import int4_matmul

        y = int4_matmul(x, qweight, scales, zeros, group_size, gemv_rows=_GEMV_ROWS["int4"])
        return y if bias is None else y + bias
    return ref.int4_linear_ref(x, qweight, scales, zeros, group_size, bias)


def nf4_linear(
    x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, block_size: int,
    bias: torch.Tensor | None = None, lut: torch.Tensor | None = None,
) -> torch.Tensor:
    """``lut``: the 16 NF4 levels on x's device (a module buffer, so compiled graphs see a tensor
    rather than a cached function call)."""
    if _use_triton(x):
        from llmopt.quant.kernels.triton_wo import nf4_matmul

        y = nf4_matmul(x, qweight, absmax, block_size, lut, gemv_rows=_GEMV_ROWS["nf4"])
        return y if bias is None else y + bias
    return ref.nf4_linear_ref(x, qweight, absmax, block_size, bias, lut)


def fp8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
    mode: str = "dequant",
) -> torch.Tensor:
    if x.device.type == "cuda" and mode == "scaled_mm":
        from llmopt.quant.kernels.fp8_scaled_mm import fp8_scaled_mm

        y = fp8_scaled_mm(x, qweight, scales)
        return y if bias is None else y + bias
    if _use_triton(x):
        from llmopt.quant.kernels.triton_wo import fp8_matmul

        y = fp8_matmul(x, qweight, scales, gemv_rows=_GEMV_ROWS["fp8"])
        return y if bias is None else y + bias
    return ref.fp8_linear_ref(x, qweight, scales, bias)
