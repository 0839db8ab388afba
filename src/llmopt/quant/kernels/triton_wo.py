"""Triton fused dequantise-and-matmul for weight-only formats (CUDA; batch 1..16 and beyond).

One kernel, specialised at compile time by ``FMT``:
  0 int8  : w [N, K] int8, per-channel scale applied after the dot (codes are exact in bf16)
  1 int4  : codes [K/8, N] int32 packed along K, asymmetric: w = (q - zero[g, n]) * scale[g, n]
  2 nf4   : codes [K/8, N] int32, w = NF4[q] * absmax[g, n]
  3 fp8   : w [N, K] float8_e4m3fn, per-channel scale applied after the dot
  4 int8g : w [N, K] int8, asymmetric per group along K: w = (q - zero[g, n]) * scale[g, n]

Each program computes a [BLOCK_M, BLOCK_N] tile of the output over one of SPLIT_K contiguous
slices of K; with SPLIT_K > 1 the partial sums are added atomically into a float32 output.
Split-K is what fills an H100 at batch 1: N / BLOCK_N alone is ~64-128 programs for 4096-wide
layers, too few to keep 132 SMs streaming weights. When a K tile lies inside one quantisation
group (BLOCK_K <= GROUP; tiles are aligned) the group's scale multiplies the tile's partial dot
once per column instead of once per weight.

References: ``reference.py`` (the plain-PyTorch paths); tests: tests/test_quant_kernels.py.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

import llmopt.kernels
from llmopt.quant.kernels import (
    GEMV_MAX_ROWS,
    GEMV_PREFETCH,
    GEMV_STAGES,
    INT_DECODE,
    NF4_DECODE,
    NF4_DECODES,
    ONE_ROW,
)
from llmopt.quant.kernels import INT_DECODES as DECODES
from llmopt.quant.primitives import nf4_codebook

FMT_INT8, FMT_INT4, FMT_NF4, FMT_FP8, FMT_INT8G = 0, 1, 2, 3, 4
FMT_DENSE = 5  # one-row kernel only: unquantised bf16/fp16 weights [N, K], no scale
BLOCK_M = 16  # tl.dot's minimum; rows beyond M are masked
# LLMOPT_GEMV_ONE_ROW (ONE_ROW), LLMOPT_INT_DECODE (INT_DECODE, values in DECODES),
# LLMOPT_NF4_DECODE (NF4_DECODE) and LLMOPT_GEMV_PREFETCH (GEMV_PREFETCH) are read, checked and
# explained in ``quant/kernels/__init__.py``,
# LLMOPT_KERNEL_PDL (``llmopt.kernels.KERNEL_PDL``, read at each call) in ``llmopt/kernels/__init__.py``.


def _configs() -> list[triton.Config]:
    # (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages): a small set, so autotuning stays
    # within seconds per shape.
    table = [
        (64, 64, 1, 4, 4), (64, 128, 1, 4, 3), (32, 128, 2, 4, 4), (64, 128, 4, 4, 3),
        (128, 64, 4, 4, 3), (64, 32, 8, 4, 4), (128, 128, 2, 8, 3), (32, 64, 8, 2, 4),
    ]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
            for bn, bk, sk, w, s in table]


@triton.jit
def _split_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The first k and the length of this program's share of K (program_id(1) of SPLIT_K
    contiguous, BLOCK_K-aligned ranges)."""
    k_per_split = tl.cdiv(K, BLOCK_K * SPLIT_K) * BLOCK_K
    return tl.program_id(1) * k_per_split, k_per_split


@triton.autotune(configs=_configs(), key=["M", "N", "K", "FMT", "GROUP"], reset_to_zero=["out_ptr"])
@triton.jit
def _wo_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start, k_per_split = _split_range(K, BLOCK_K, SPLIT_K)  # each split owns a contiguous range of K
    for kk in range(0, k_per_split, BLOCK_K):
        k0 = k_start + kk
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        wmask = mask_k[:, None] & mask_n[None, :]
        if FMT == 0:
            w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=wmask, other=0)  # [BK, BN]
            acc += tl.dot(x, w.to(x.dtype))
        elif FMT == 3:
            w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=wmask, other=0.0)
            acc += tl.dot(x, w.to(x.dtype))
        else:
            if FMT == 4:
                q = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=wmask, other=0)  # [BK, BN] int8
            else:
                # 8 consecutive k share one int32 word; the repeated loads hit L1.
                q = tl.load(w_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=wmask, other=0)
                q = (q >> ((offs_k[:, None] % 8) * 4)) & 0xF  # [BK, BN] codes
            if BLOCK_K <= GROUP:
                g = k0 // GROUP
                # a split's last tiles may lie past K: their group row does not exist
                mask_g = mask_n & ((offs_n * 0 + k0) < K)
                s = tl.load(s_ptr + g * N + offs_n, mask=mask_g, other=0.0).to(tl.float32)  # [BN]
                if FMT == 1 or FMT == 4:
                    z = tl.load(z_ptr + g * N + offs_n, mask=mask_g, other=0.0).to(tl.float32)
                    # integers in [-15, 15] (int4) or [-255, 255] (int8g): exact in bf16
                    w = q.to(tl.float32) - z[None, :]
                else:
                    w = tl.load(lut_ptr + q)
                acc += tl.dot(x, w.to(x.dtype)) * s[None, :]
            else:
                g2 = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
                s = tl.load(s_ptr + g2, mask=wmask, other=0.0).to(tl.float32)  # [BK, BN]
                if FMT == 1 or FMT == 4:
                    z = tl.load(z_ptr + g2, mask=wmask, other=0.0).to(tl.float32)
                    w = (q.to(tl.float32) - z) * s
                else:
                    w = tl.load(lut_ptr + q) * s
                acc += tl.dot(x, w.to(x.dtype))
    if FMT == 0 or FMT == 3:
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    omask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=omask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=omask)


# -- few-row kernels (decode at batch 1..GEMV_MAX_ROWS; LLMOPT_WO_KERNEL=triton-gemv) ----------------
# No tl.dot (whose 16-row tile wastes 15 rows at batch 1), and big tiles along K, so that each
# iteration has kilobytes of weights in flight: the matmul kernel's small tiles (2-4 KB per step)
# left the int4 path latency-bound at 0.4-0.6 TB/s on an H200. A tile covers whole quantisation
# groups (BLOCK_K a multiple of GROUP) or lies inside one (GROUP a multiple of BLOCK_K), so the
# zero point comes out of each group's sum: sum_k (q - z) s x = s (sum_k q x - z sum_k x).
# Tiles and groups are powers of two (``_launch`` checks the group size), so one always nests in
# the other. Each weight tile is loaded and decoded once and then used for every input row (up
# to BLOCK_M, unrolled), so a few rows cost little more weight traffic than one.


def _tile_configs(table: list[tuple[int, ...]], stages: int | None = None) -> list[triton.Config]:
    """Configs from (BLOCK_N, BLOCK_K, [SPLIT_K,] num_warps) rows; ``stages``: the one-row
    kernels' STAGES (LLMOPT_GEMV_STAGES) in each."""
    names = ("BLOCK_N", "BLOCK_K", "SPLIT_K")
    extra = {} if stages is None else {"STAGES": stages}
    return [triton.Config({**dict(zip(names, row[:-1], strict=False)), **extra}, num_warps=row[-1]) for row in table]


def _packed_gemv_configs() -> list[triton.Config]:
    # (BLOCK_N, BLOCK_K, SPLIT_K, num_warps): BLOCK_K x BLOCK_N / 2 bytes of codes per iteration
    # (tiles whose registers spilled in ptxas for sm_90 were left out)
    return _tile_configs([(64, 256, 4, 4), (128, 256, 2, 8), (32, 512, 4, 8), (32, 512, 4, 4),
                          (128, 128, 4, 4), (256, 64, 4, 8), (32, 256, 8, 4), (64, 128, 8, 4)])


def _rowmajor_gemv_configs() -> list[triton.Config]:
    # (BLOCK_N, BLOCK_K, num_warps): BLOCK_N rows of BLOCK_K contiguous bytes per iteration. No
    # split-K: each program owns whole output rows and stores them in the activation dtype, so a
    # call is one kernel (split-K needed a zeroed float32 buffer and a cast after it: two more
    # small kernels per call, in a decode step of 225 matmuls at 7B). At N = 4096 the tiles give
    # 64 to 1,024 programs.
    return _tile_configs([(16, 512, 4), (32, 256, 4), (8, 1024, 4), (8, 512, 4), (16, 256, 4),
                          (64, 128, 8), (4, 2048, 4), (4, 1024, 2)])


def gemv_configs(configs: list[triton.Config], rows: int) -> list[triton.Config]:
    """The tiles tried for ``rows`` input rows: all of them for one row; for several (more
    values live) only tiles of at most 16 K weights and 64 output columns (wider ones spilled
    registers in ptxas for sm_90 at 8 rows). A fixed list per autotuner rather than a
    prune_configs_by hook, which torch.compile (2.11) cannot trace."""
    if rows == 1:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 16384
            and c.kwargs["BLOCK_N"] <= 64]


@triton.jit
def _nf4_select(c):
    """The NF4 level (``nf4_codebook()``, float32, ascending) of each 4-bit code in c: bit 0 picks
    within pairs, bit 1 between pairs, bit 2 between quads, bit 3 between halves."""
    b0 = (c & 1) != 0
    b1 = (c & 2) != 0
    b2 = (c & 4) != 0
    b3 = (c & 8) != 0
    p0 = tl.where(b0, -0.6961928009986877, -1.0)
    p1 = tl.where(b0, -0.39491742849349976, -0.5250729322433472)
    p2 = tl.where(b0, -0.18477340042591095, -0.2844413220882416)
    p3 = tl.where(b0, 0.0, -0.09104997664690018)
    p4 = tl.where(b0, 0.16093014180660248, 0.07958031445741653)
    p5 = tl.where(b0, 0.3379151225090027, 0.24611225724220276)
    p6 = tl.where(b0, 0.5626168847084045, 0.4407097399234772)
    p7 = tl.where(b0, 1.0, 0.722956657409668)
    q0 = tl.where(b1, p1, p0)
    q1 = tl.where(b1, p3, p2)
    q2 = tl.where(b1, p5, p4)
    q3 = tl.where(b1, p7, p6)
    return tl.where(b3, tl.where(b2, q3, q2), tl.where(b2, q1, q0))


def nf4_byte_tables() -> tuple[list[int], list[int]]:
    """The 16 NF4 levels rounded to bfloat16, split into two tables of 16 bytes (high bytes,
    low bytes), each packed little-endian into four 32-bit words: word w, byte b holds level
    4w + b. ``prmt`` (byte permute) looks up four codes of a word at once in such a table."""
    bits = nf4_codebook().to(torch.bfloat16).view(torch.int16).int() & 0xFFFF
    def words(bytes_: list[int]) -> list[int]:
        return [sum(bytes_[4 * w + b] << (8 * b) for b in range(4)) for w in range(4)]
    return words([(v >> 8) & 0xFF for v in bits.tolist()]), words([v & 0xFF for v in bits.tolist()])


def nf4_level_bytes_ptx() -> list[str]:
    """PTX lines that look up four NF4 codes at once: with the selector ``s`` (the codes' low
    three bits, one per nibble) and ``sh`` (0x3210 plus 4 where a code's bit 3 is set), the
    levels' high bytes into ``hh`` and their low bytes into ``ll`` (uses ``a`` and ``b``): per
    byte table a permute into its first 8 entries, one into its last 8, and a third picking
    between them. Shared by this module's decode and ``triton_int4_mma``'s."""
    hi, lo = nf4_byte_tables()
    lines = []
    for table, dst in ((hi, "hh"), (lo, "ll")):
        lines += [f"prmt.b32 a, {table[0]:#010x}, {table[1]:#010x}, s;",
                  f"prmt.b32 b, {table[2]:#010x}, {table[3]:#010x}, s;",
                  f"prmt.b32 {dst}, a, b, sh;"]
    return lines


def _nf4_prmt_asm() -> str:
    """PTX that turns one int32 of eight NF4 codes (code j at bits 4j..4j+3) into the eight
    levels as float32 bit patterns ($0..$7), with byte permutes instead of a codebook load per
    weight. Per four codes and per byte table: a permute into the table's first 8 entries and one
    into its last 8 (selector: the codes' low three bits), and a third picking, byte by byte,
    between the two by the codes' bit 3 (selector 0x3210, plus 4 where bit 3 is set). Then the
    high and low bytes are interleaved into two bfloat16 pairs, whose halves shift or mask into
    float32: 29 integer instructions per eight weights, no memory access."""
    lines = ["{", ".reg .b32 s, sh, a, b, hh, ll, w;",
             "and.b32 s, $8, 0x77777777;",               # codes' low three bits
             "and.b32 sh, $8, 0x88888888;",
             "shr.u32 sh, sh, 1;",                       # bit 3 -> 4 in each nibble
             "or.b32 sh, sh, 0x32103210;"]
    for half in range(2):
        if half:
            lines += ["shr.u32 s, s, 16;", "shr.u32 sh, sh, 16;"]  # prmt reads selector bits 0-15
        lines += nf4_level_bytes_ptx()
        o = 4 * half
        for pair, sel in ((0, "0x5140"), (1, "0x7362")):  # [lo0 hi0 lo1 hi1], [lo2 hi2 lo3 hi3]
            lines += [f"prmt.b32 w, ll, hh, {sel};",
                      f"shl.b32 ${o + 2 * pair}, w, 16;",
                      f"and.b32 ${o + 2 * pair + 1}, w, 0xffff0000;"]
    return "\n".join(lines + ["}"])


@triton.jit
def _nf4_prmt(q):
    """The eight NF4 levels (bfloat16-rounded, as float32 bits) of each int32 word of codes in q.
    The PTX is ``_nf4_prmt_asm()`` written out: torch.compile copies a kernel's source into its
    own module, so the kernel names no module-level constant (a test checks the two agree)."""
    return tl.inline_asm_elementwise(
        """
        {
        .reg .b32 s, sh, a, b, hh, ll, w;
        and.b32 s, $8, 0x77777777;
        and.b32 sh, $8, 0x88888888;
        shr.u32 sh, sh, 1;
        or.b32 sh, sh, 0x32103210;
        prmt.b32 a, 0xbebfbfbf, 0x00bdbebe, s;
        prmt.b32 b, 0x3e3e3e3d, 0x3f3f3f3e, s;
        prmt.b32 hh, a, b, sh;
        prmt.b32 a, 0xca063280, 0x00ba3d92, s;
        prmt.b32 b, 0xad7c25a3, 0x803910e2, s;
        prmt.b32 ll, a, b, sh;
        prmt.b32 w, ll, hh, 0x5140;
        shl.b32 $0, w, 16;
        and.b32 $1, w, 0xffff0000;
        prmt.b32 w, ll, hh, 0x7362;
        shl.b32 $2, w, 16;
        and.b32 $3, w, 0xffff0000;
        shr.u32 s, s, 16;
        shr.u32 sh, sh, 16;
        prmt.b32 a, 0xbebfbfbf, 0x00bdbebe, s;
        prmt.b32 b, 0x3e3e3e3d, 0x3f3f3f3e, s;
        prmt.b32 hh, a, b, sh;
        prmt.b32 a, 0xca063280, 0x00ba3d92, s;
        prmt.b32 b, 0xad7c25a3, 0x803910e2, s;
        prmt.b32 ll, a, b, sh;
        prmt.b32 w, ll, hh, 0x5140;
        shl.b32 $4, w, 16;
        and.b32 $5, w, 0xffff0000;
        prmt.b32 w, ll, hh, 0x7362;
        shl.b32 $6, w, 16;
        and.b32 $7, w, 0xffff0000;
        }
        """,
        "=r,=r,=r,=r,=r,=r,=r,=r,r", [q], dtype=(tl.int32,) * 8, is_pure=True, pack=1)


@triton.jit
def _add_row(acc, contrib, rows, m):
    """acc [BLOCK_M, BN] with contrib [BN] added to row m (a register tile has no row store)."""
    return acc + tl.where(rows[:, None] == m, contrib[None, :], 0.0)


@triton.jit
def _packed_gemv(
    x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, out_ptr, M, N, K, stride_xm,
    FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, NF4_SELECT: tl.constexpr = False,
):
    """x [M, K] against 4-bit codes [K/8, N] (int4 or nf4) into a float32 out [M, N]: each
    int32 word loaded once and split into its 8 codes by broadcast shifts ([BK/8, 8, BN]), then
    viewed per group as [NG, GK, BN] and decoded once for all M rows."""
    NG: tl.constexpr = BLOCK_K // GROUP if BLOCK_K >= GROUP else 1  # groups per tile
    GK: tl.constexpr = GROUP if BLOCK_K >= GROUP else BLOCK_K  # of the tile's k, per group
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows_m = tl.arange(0, BLOCK_M)
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start, k_per_split = _split_range(K, BLOCK_K, SPLIT_K)
    for kk in range(0, k_per_split, BLOCK_K):
        k0 = k_start + kk
        offs_k = k0 + tl.arange(0, BLOCK_K)
        rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        q = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :],
                    mask=(rows[:, None] < K // 8) & mask_n[None, :], other=0)  # [BK/8, BN]
        codes = tl.reshape((q[:, None, :] >> shifts[None, :, None]) & 0xF, (NG, GK, BLOCK_N))
        g = k0 // GROUP + tl.arange(0, NG)
        gmask = ((g * GROUP)[:, None] < K) & mask_n[None, :]
        sc = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
        if FMT == 1:
            wv = codes.to(tl.float32)
            zp = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
        elif NF4_SELECT:
            wv = _nf4_select(codes)  # [NG, GK, BN]
        else:
            wv = tl.load(lut_ptr + codes).to(tl.float32)  # [NG, GK, BN]
        for m in tl.static_range(BLOCK_M):
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=(offs_k < K) & (offs_k * 0 + m < M),
                        other=0.0).to(tl.float32)  # [BK]
            x3 = tl.reshape(x, (NG, GK))
            dot = tl.sum(wv * x3[:, :, None], axis=1)  # [NG, BN]
            if FMT == 1:
                dot = dot - zp * tl.sum(x3, axis=1)[:, None]
            acc = _add_row(acc, tl.sum(sc * dot, axis=0), rows_m, m)
    out_ptrs = out_ptr + rows_m[:, None] * N + offs_n[None, :]
    omask = (rows_m[:, None] < M) & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=omask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=omask)


@triton.jit
def _rowmajor_gemv(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm,
    FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """x [M, K] against row-major weights w [N, K] (int8, fp8, int8g; FMT_DENSE: plain bf16/fp16,
    the baseline the quantised formats are measured against) into out [M, N]: each program reads
    BLOCK_N rows of BLOCK_K contiguous weights per iteration, sums along K in float32 for every
    input row and stores its outputs in out's dtype."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    NG: tl.constexpr = BLOCK_K // GROUP if BLOCK_K >= GROUP else 1  # int8g: groups per tile
    GK: tl.constexpr = GROUP if BLOCK_K >= GROUP else BLOCK_K
    rows_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0 if FMT == 3 or FMT == 5 else 0).to(tl.float32)  # [BN, BK]
        if FMT == 4:
            w3 = tl.reshape(w, (BLOCK_N, NG, GK))
            g = k0 // GROUP + tl.arange(0, NG)
            gmask = mask_n[:, None] & ((g * GROUP)[None, :] < K)
            sc = tl.load(s_ptr + g[None, :] * N + offs_n[:, None], mask=gmask, other=0.0).to(tl.float32)
            zp = tl.load(z_ptr + g[None, :] * N + offs_n[:, None], mask=gmask, other=0.0).to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=mask_k & (offs_k * 0 + m < M), other=0.0).to(tl.float32)
            if FMT == 4:
                x3 = tl.reshape(x, (NG, GK))
                dot = tl.sum(w3 * x3[None, :, :], axis=2)  # [BN, NG]
                contrib = tl.sum(sc * (dot - zp * tl.sum(x3, axis=1)[None, :]), axis=1)
            else:
                contrib = tl.sum(w * x[None, :], axis=1)
            acc = _add_row(acc, contrib, rows_m, m)
    if FMT == 0 or FMT == 3:  # per-channel scale after the sum
        acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows_m[:, None] < M) & mask_n[None, :])



# -- one-row kernels with deferred sums (batch-1 decode; LLMOPT_GEMV_ONE_ROW=deferred) ------------
# The few-row kernels above reduce every tile along K as they go (a tl.sum per tile and row). K
# lies across the threads of a warp, so each iteration pays warp shuffles, and in the packed
# kernel shared-memory layout conversions with barriers (for sm_90, per iteration of a
# 64 x 256 int4 tile: 26 BAR, 43 LDS, 10 SHFL in SASS). These two keep one float32 partial sum
# per weight position in registers, add each weight's product into it (one FMA) and reduce
# across K once, after the loop. Integer codes become floats in one of two ways (INT_DECODE):
#   0  a conversion instruction (for int8 the I2F path, a fraction of the FMA rate on sm_90;
#      measured at 7B: 204.8 tok/s against 292.3 with the trick);
#   1  the exponent trick: a code placed (ORed, or for int8 added with its offset) into the
#      mantissa of a power of two reads as that power plus the code, so integer ops replace the
#      conversion and the offset comes out of the sum (``_nibble_float``; int8 subtracts it).


@triton.jit
def _nibble_float(word, nib, P: tl.constexpr):
    """The 4-bit code at bits 4P..4P+3 of each int32 in ``word`` (P = 3 or 4), ORed in place into
    the mantissa of 2^(23 - 4P): the bits read as the float 2^(23 - 4P) + code exactly (2048 +
    code, 128 + code), with one AND-OR and no conversion. The caller takes the offset out of the
    tile's sum once per word (``_packed_gemv1``). ``nib`` is 15 passed at run time: as a
    compile-time constant, ptxas re-creates the shifted mask in a register before every AND-OR."""
    return ((word & (nib << (4 * P))) | ((127 + 23 - 4 * P) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _packed_tile_load(w_ptr, s_ptr, z_ptr, k0, row_end, N, offs_n, mask_n,
                      FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The codes [BLOCK_K/8, BLOCK_N] of the tile at k0, its scales and (int4) zeros, as loaded:
    nothing here reads them, so a load issued for the next tile (``PREFETCH``) does not stall
    the warp until ``_packed_tile_dot`` uses it. Word rows from ``row_end`` on are not read.
    Scales are [1, BLOCK_N] when the tile lies in one group, else one per word row
    [BLOCK_K/8, BLOCK_N]; without zeros (nf4) the scales stand in for them."""
    R: tl.constexpr = BLOCK_K // 8
    rows = k0 // 8 + tl.arange(0, R)
    m2 = (rows < row_end)[:, None] & mask_n[None, :]
    q = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=m2, other=0)  # [R, BN]
    if BLOCK_K <= GROUP:  # the whole tile in one group: one scale (and zero) per column
        gmask = mask_n & ((offs_n * 0 + k0 // 8) < row_end)
        sc = tl.load(s_ptr + (k0 // GROUP) * N + offs_n, mask=gmask, other=0.0)[None, :]
        zp = sc
        if FMT == 1:
            zp = tl.load(z_ptr + (k0 // GROUP) * N + offs_n, mask=gmask, other=0.0)[None, :]
    else:  # several groups: each word row's own (repeated addresses, served by L1)
        g2 = ((rows * 8) // GROUP)[:, None] * N + offs_n[None, :]
        sc = tl.load(s_ptr + g2, mask=m2, other=0.0)
        zp = sc
        if FMT == 1:
            zp = tl.load(z_ptr + g2, mask=m2, other=0.0)
    return q, sc, zp


@triton.jit
def _packed_tile_dot(acc, q, sc_raw, zp_raw, x_ptr, k0, K, nib, lut_ptr,
                     FMT: tl.constexpr, BLOCK_K: tl.constexpr, NF4_DECODE: tl.constexpr,
                     INT_DECODE: tl.constexpr):
    """acc [BLOCK_K/8, BLOCK_N] plus one tile's products (``_packed_gemv1``); code j of each word
    (k = 8 * row + j) is taken out by a static loop over j, so every weight stays in the register
    where its word was loaded."""
    R: tl.constexpr = BLOCK_K // 8
    rows = k0 // 8 + tl.arange(0, R)
    rmask = rows < K // 8
    sc = sc_raw.to(tl.float32)
    t = tl.zeros(q.shape, dtype=tl.float32)
    xo = tl.zeros((R,), dtype=tl.float32)  # x summed over a word's odd codes
    xe = tl.zeros((R,), dtype=tl.float32)  # and over its even codes
    if FMT == 1 and INT_DECODE == 1:
        # each code at bits 12-15 (P = 3: odd codes) or 16-19 (P = 4: even codes) of one of
        # five words: 0 of q << 16, 1-2 of q << 8, 3-4 of q, 5-6 of q >> 8, 7 of q >> 16
        words = (q << 16, q << 8, q << 8, q, q, q >> 8, q >> 8, q >> 16)
    if FMT == 2 and NF4_DECODE == 2:  # all eight levels of each word at once
        levels = _nf4_prmt(q)
    for j in tl.static_range(8):
        xj = tl.load(x_ptr + rows * 8 + j, mask=rmask, other=0.0).to(tl.float32)  # [R]
        if FMT == 1:
            if INT_DECODE == 1:
                w = _nibble_float(words[j], nib, 3 + (j + 1) % 2)  # 2048 or 128 + code
            else:
                w = ((q >> (4 * j)) & 0xF).to(tl.float32)
            if j % 2 == 1:
                xo += xj
            else:
                xe += xj
        elif NF4_DECODE == 2:
            w = levels[j].to(tl.float32, bitcast=True)
        elif NF4_DECODE == 1:
            w = _nf4_select((q >> (4 * j)) & 0xF)
        else:
            w = tl.load(lut_ptr + ((q >> (4 * j)) & 0xF))
        t += w * xj[:, None]
    if FMT == 1:  # sum_k (q - z) s x = s (sum_k q x - z sum_k x), per word row
        zp = zp_raw.to(tl.float32)
        if INT_DECODE == 1:  # and the codes' offsets: 2048 on odd codes, 128 on even ones
            acc += sc * (t - (zp + 2048.0) * xo[:, None] - (zp + 128.0) * xe[:, None])
        else:
            acc += sc * (t - zp * (xo + xe)[:, None])
    else:
        acc += sc * t
    return acc


@triton.jit
def _packed_gemv1(
    x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, out_ptr, N, K, nib,
    FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, NF4_DECODE: tl.constexpr, INT_DECODE: tl.constexpr, PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, STAGES: tl.constexpr = 0,
):
    """One row x [K] against 4-bit codes [K/8, N] (int4 or nf4) into a zeroed float32 out [N]
    (split-K partial sums added atomically). A tile is [BLOCK_K/8, BLOCK_N] int32 words.
    ``nib``: 15 (see ``_nibble_float``). NF4_DECODE: the NF4 levels loaded from the codebook
    (0), picked by selects (1) or by byte permutes (2, see ``_nf4_prmt_asm``). ``PREFETCH``
    (LLMOPT_GEMV_PREFETCH): each iteration first issues the next tile's loads, then computes on
    the tile loaded the iteration before, so the memory latency overlaps the arithmetic.
    ``STAGES`` > 1 (LLMOPT_GEMV_STAGES, when not PREFETCH): the K loop software-pipelined over
    that many stages, the next tiles copied to shared memory asynchronously (cp.async); 0 gives
    the plain loop (for sm_90, the same PTX as a plain ``range``)."""
    R: tl.constexpr = BLOCK_K // 8  # word rows per tile
    if PDL:  # a programmatic dependent launch: the kernel before may still be running
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    k_start, k_per_split = _split_range(K, BLOCK_K, SPLIT_K)
    if PREFETCH:
        # this program's share ends at word row `share_end`: the load after its last tile reads nothing
        share_end = tl.minimum(k_start + k_per_split, K) // 8
        q, sc, zp = _packed_tile_load(w_ptr, s_ptr, z_ptr, k_start, share_end, N, offs_n, mask_n,
                                      FMT, GROUP, BLOCK_K)
        for kk in range(0, k_per_split, BLOCK_K):
            k0 = k_start + kk
            qn, scn, zpn = _packed_tile_load(w_ptr, s_ptr, z_ptr, k0 + BLOCK_K, share_end, N, offs_n, mask_n,
                                             FMT, GROUP, BLOCK_K)
            acc = _packed_tile_dot(acc, q, sc, zp, x_ptr, k0, K, nib, lut_ptr, FMT, BLOCK_K, NF4_DECODE, INT_DECODE)
            q, sc, zp = qn, scn, zpn
    else:
        for kk in tl.range(0, k_per_split, BLOCK_K, num_stages=STAGES):
            k0 = k_start + kk
            q, sc, zp = _packed_tile_load(w_ptr, s_ptr, z_ptr, k0, K // 8, N, offs_n, mask_n, FMT, GROUP, BLOCK_K)
            acc = _packed_tile_dot(acc, q, sc, zp, x_ptr, k0, K, nib, lut_ptr, FMT, BLOCK_K, NF4_DECODE, INT_DECODE)
    if PDL:  # the next kernel may launch (and wait on the device for this one to finish)
        tl.extra.cuda.gdc_launch_dependents()
    out = tl.sum(acc, axis=0)
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_n, out, mask=mask_n)
    else:
        tl.atomic_add(out_ptr + offs_n, out, mask=mask_n)


@triton.jit
def _rowmajor_tile_load(w_ptr, offs_n, mask_n, k0, K, FMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weights [BLOCK_N, BLOCK_K] at k0, as loaded (see ``_packed_tile_load``); past K: none."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :],
                   other=0.0 if FMT == 3 or FMT == 5 else 0)


@triton.jit
def _rowmajor_tile_dot(acc, w, x_ptr, k0, K, FMT: tl.constexpr, BLOCK_K: tl.constexpr,
                       INT_DECODE: tl.constexpr):
    """acc [BLOCK_N, BLOCK_K] plus one tile's products (``_rowmajor_gemv1``)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if FMT == 0 and INT_DECODE == 1:  # int8 q + 2^23 + 128 is 2^23's bits with q + 128 in the mantissa
        wf = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        wf = w.to(tl.float32)
    # x as a [1, BLOCK_K] tile, so it takes the weights' layout (a 1-D load would be
    # converted through shared memory, with barriers, every iteration)
    x = tl.load(x_ptr + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0).to(tl.float32)
    return acc + wf * x


@triton.jit
def _rowmajor_gemv1(
    x_ptr, w_ptr, s_ptr, out_ptr, N, K,
    FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT_DECODE: tl.constexpr,
    PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False, STAGES: tl.constexpr = 0,
):
    """One row x [K] against row-major per-channel weights w [N, K] (int8, fp8, FMT_DENSE) into
    out [N] in out's dtype: a [BLOCK_N, BLOCK_K] float32 partial sum in registers, reduced along
    K after the loop, then the per-channel scale. ``PDL``, ``PREFETCH``, ``STAGES``: as in
    ``_packed_gemv1`` (STAGES is 3 by default here: LLMOPT_GEMV_STAGES)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PREFETCH:
        w = _rowmajor_tile_load(w_ptr, offs_n, mask_n, 0, K, FMT, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            wn = _rowmajor_tile_load(w_ptr, offs_n, mask_n, k0 + BLOCK_K, K, FMT, BLOCK_K)
            acc = _rowmajor_tile_dot(acc, w, x_ptr, k0, K, FMT, BLOCK_K, INT_DECODE)
            w = wn
    else:
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            w = _rowmajor_tile_load(w_ptr, offs_n, mask_n, k0, K, FMT, BLOCK_K)
            acc = _rowmajor_tile_dot(acc, w, x_ptr, k0, K, FMT, BLOCK_K, INT_DECODE)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    out = tl.sum(acc, axis=1)
    if FMT == 0 or FMT == 3:  # per-channel scale after the sum
        out = out * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


# Tiles of the one-row kernels. Packed: (BLOCK_N, BLOCK_K, SPLIT_K, num_warps), 64-128 codes per
# thread per iteration. Row-major: (BLOCK_N, BLOCK_K, num_warps), no split-K, so at most 32 rows
# per program (N = 4096 gives 128 to 1,024 programs), BLOCK_N x BLOCK_K / (32 num_warps) partial
# sums per thread. None spills registers for sm_90 (tests/test_quant_kernels.py).
ONE_ROW_TILES = {
    "packed": [(64, 256, 4, 4), (128, 256, 2, 8), (32, 512, 4, 4), (64, 128, 8, 4), (128, 128, 4, 4),
               (256, 64, 4, 8), (32, 256, 8, 4), (64, 512, 2, 8)],
    "rowmajor": [(16, 512, 4), (8, 1024, 4), (16, 256, 4), (8, 512, 4), (32, 256, 4), (4, 1024, 4),
                 (32, 128, 8), (16, 128, 2)],
}


_packed_gemv1_kernel = triton.autotune(configs=_tile_configs(ONE_ROW_TILES["packed"], GEMV_STAGES["packed"]),
                                       key=["N", "K", "FMT", "GROUP", "NF4_DECODE", "INT_DECODE", "PREFETCH"],
                                       reset_to_zero=["out_ptr"])(_packed_gemv1)
_rowmajor_gemv1_kernel = triton.autotune(configs=_tile_configs(ONE_ROW_TILES["rowmajor"], GEMV_STAGES["rowmajor"]),
                                         key=["N", "K", "FMT", "INT_DECODE", "PREFETCH"])(_rowmajor_gemv1)

# One autotuner per kernel for one row and one for 2..GEMV_MAX_ROWS (BLOCK_M is in the key, so
# each row count keeps its own choice).
_GEMV_KEY = ["N", "K", "FMT", "GROUP", "BLOCK_M"]
_packed_gemv_kernel = triton.autotune(configs=_packed_gemv_configs(), key=_GEMV_KEY,
                                      reset_to_zero=["out_ptr"])(_packed_gemv)
_packed_gemv_rows_kernel = triton.autotune(configs=gemv_configs(_packed_gemv_configs(), 8),
                                           key=_GEMV_KEY, reset_to_zero=["out_ptr"])(_packed_gemv)
_rowmajor_gemv_kernel = triton.autotune(configs=_rowmajor_gemv_configs(), key=_GEMV_KEY)(_rowmajor_gemv)
_rowmajor_gemv_rows_kernel = triton.autotune(configs=gemv_configs(_rowmajor_gemv_configs(), 8),
                                             key=_GEMV_KEY)(_rowmajor_gemv)

def _gemv1(x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, lut: torch.Tensor,
           fmt: int, group: int, nf4_dec: int, dec: int, prefetch: bool, pdl: bool) -> torch.Tensor:
    """One row x2 [1, K] through the deferred-sum kernels: out [N], the packed formats' float32
    split-K sums (the caller casts them, so that under torch.compile the cast joins the next
    generated kernel even when this call is the opaque PDL op), the row-major ones' in x2's dtype.
    ``prefetch``: the kernels' PREFETCH (LLMOPT_GEMV_PREFETCH)."""
    k = x2.shape[-1]
    launch = {"launch_pdl": True} if pdl else {}  # not passed otherwise: dynamo traces the plain call
    if fmt in (FMT_INT4, FMT_NF4):
        n = w.shape[1]
        out = torch.zeros((n,), device=x2.device, dtype=torch.float32)
        _packed_gemv1_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])](
            x2, w, s, z, lut, out, n, k, 15, FMT=fmt, GROUP=group,
            NF4_DECODE=nf4_dec, INT_DECODE=dec, PDL=pdl, PREFETCH=prefetch, **launch)
        return out
    n = w.shape[0]
    out = torch.empty((n,), device=x2.device, dtype=x2.dtype)
    _rowmajor_gemv1_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x2, w, s, out, n, k, FMT=fmt, INT_DECODE=dec, PDL=pdl, PREFETCH=prefetch, **launch)
    return out


@torch.library.custom_op("llmopt::gemv1", mutates_args=())
def gemv1_pdl_op(x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, lut: torch.Tensor,
                 fmt: int, group: int, nf4_dec: int, dec: int, prefetch: bool) -> torch.Tensor:
    """The one-row kernels as programmatic dependent launches, opaque to torch.compile so that
    Triton's launcher (which takes ``launch_pdl``) starts them rather than inductor's."""
    return _gemv1(x2, w, s, z, lut, fmt, group, nf4_dec, dec, prefetch, True)


@gemv1_pdl_op.register_fake
def _(x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, lut: torch.Tensor,
      fmt: int, group: int, nf4_dec: int, dec: int, prefetch: bool) -> torch.Tensor:
    if fmt in (FMT_INT4, FMT_NF4):
        return x2.new_empty((w.shape[1],), dtype=torch.float32)
    return x2.new_empty((w.shape[0],))


def gemv(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, lut: torch.Tensor,
         fmt: int, group: int, one_row: str | None = None, int_decode: str | None = None,
         nf4_decode: str | None = None, pdl: bool | None = None,
         prefetch: bool | None = None) -> torch.Tensor:
    """x [..., K] holding at most GEMV_MAX_ROWS rows, against any weight-only format
    (``FMT_*``); int4/nf4 codes [K/8, N], the byte formats (and FMT_DENSE) [N, K]; scales (and
    zeros) [G, N], per-channel ones [N]; with FMT_DENSE, s, z and lut are not read.
    ``one_row``/``int_decode``/``nf4_decode``/``pdl``/``prefetch`` override LLMOPT_GEMV_ONE_ROW/
    LLMOPT_INT_DECODE/LLMOPT_NF4_DECODE/LLMOPT_KERNEL_PDL/LLMOPT_GEMV_PREFETCH (benchmarks, tests)."""
    k = x.shape[-1]
    packed = fmt in (FMT_INT4, FMT_NF4)
    n = w.shape[1] if packed else w.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    block_m = triton.next_power_of_2(m)
    nf4_dec = NF4_DECODES[nf4_decode or NF4_DECODE]
    deferred = one_row == "deferred" or (one_row is None and ONE_ROW == "deferred" and fmt != FMT_DENSE)
    if m == 1 and deferred and fmt != FMT_INT8G:
        dec = DECODES[int_decode or INT_DECODE]
        pre = prefetch if prefetch is not None else GEMV_PREFETCH if GEMV_PREFETCH is not None else fmt == FMT_DENSE
        if llmopt.kernels.KERNEL_PDL if pdl is None else pdl:
            out = gemv1_pdl_op(x2, w, s, z, lut, fmt, group, nf4_dec, dec, pre)
        else:
            out = _gemv1(x2, w, s, z, lut, fmt, group, nf4_dec, dec, pre, False)
        return out.to(x2.dtype).reshape(*x.shape[:-1], n)
    if not packed:  # one kernel, storing x's dtype
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
        kern = _rowmajor_gemv_kernel if m == 1 else _rowmajor_gemv_rows_kernel
        kern[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            x2, w, s, z, out, m, n, k, x2.stride(0), FMT=fmt, GROUP=group, BLOCK_M=block_m)
        return out.reshape(*x.shape[:-1], n)
    # The packed kernel splits K (too few column tiles otherwise): float32 partial sums added
    # atomically into a zeroed buffer, then one cast.
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    kern = _packed_gemv_kernel if m == 1 else _packed_gemv_rows_kernel
    kern[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])](
        x2, w, s, z, lut, out, m, n, k, x2.stride(0), FMT=fmt, GROUP=group, BLOCK_M=block_m,
        NF4_SELECT=nf4_dec == NF4_DECODES["select"] and m == 1)  # at 8 rows the selects spill (sm_90); prmt: one-row kernel only
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


@functools.cache
def _nf4_lut(device: torch.device) -> torch.Tensor:
    return nf4_codebook().to(device)


def _launch(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, lut: torch.Tensor,
            n: int, fmt: int, group: int, gemv_rows: int = 0) -> torch.Tensor:
    """``gemv_rows``: send inputs of at most that many rows (and at most GEMV_MAX_ROWS) to the
    few-row kernels (``gemv``) where they take the group size (powers of two, so tiles and
    groups nest); everything else to the tile kernel."""
    k = x.shape[-1]
    if (x.numel() <= min(gemv_rows, GEMV_MAX_ROWS) * k and group >= 8
            and group & (group - 1) == 0):
        return gemv(x, w, s, z, lut, fmt, group)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    # float32 so split-K partial sums can be added atomically; cast once at the end
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32)

    def grid(meta: dict[str, int]) -> tuple[int, int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(m, BLOCK_M))

    _wo_matmul_kernel[grid](x2, w, s, z, lut, out, m, n, k, x2.stride(0), out.stride(0),
                            FMT=fmt, GROUP=group, BLOCK_M=BLOCK_M)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                gemv_rows: int = 0) -> torch.Tensor:
    """x [..., K] @ (qweight [N, K] int8 * scales[N]).T"""
    return _launch(x, qweight, scales, scales, scales, qweight.shape[0], FMT_INT8, 1 << 30, gemv_rows)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, gemv_rows: int = 0) -> torch.Tensor:
    """x [..., K] @ W.T with W from codes [K/8, N] and scales/zeros [G, N]."""
    return _launch(x, qweight, scales, zeros, scales, qweight.shape[1], FMT_INT4, group_size, gemv_rows)


def nf4_matmul(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, block_size: int,
               lut: torch.Tensor | None = None, gemv_rows: int = 0) -> torch.Tensor:
    lut = _nf4_lut(x.device) if lut is None else lut
    return _launch(x, qweight, absmax, absmax, lut, qweight.shape[1], FMT_NF4, block_size, gemv_rows)


def int8g_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, gemv_rows: int = 0) -> torch.Tensor:
    """x [..., K] @ W.T with W = (qweight [N, K] int8 - zeros[g]) * scales[g], scales/zeros [G, N]."""
    return _launch(x, qweight, scales, zeros, scales, qweight.shape[0], FMT_INT8G, group_size, gemv_rows)


def fp8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               gemv_rows: int = 0) -> torch.Tensor:
    """Weight-only FP8: e4m3 weights converted to the activation dtype in registers."""
    return _launch(x, qweight, scales, scales, scales, qweight.shape[0], FMT_FP8, 1 << 30, gemv_rows)
