"""int4 (and NF4) decode matmul on tensor cores (CUDA, 1 to 16 input rows): the default for
batched decode (int4: 4 to 16 rows, NF4: 2 to 16; ``kernels.mma_min_rows``), and for every decode
size under ``LLMOPT_WO_KERNEL=mma``.

The one-row kernels in ``triton_wo.py`` multiply each weight on the CUDA cores: decoding a code
and its FMA cost about five instructions per weight (sm_90 SASS), so at int4 (two weights per
byte) they run out of issue slots near 1.4 TB/s on an H200, where bf16 rows stream at 3.6, and
torch's int4 GEMM (tinygemm) slows in proportion to the rows (0.7 TB/s at eight). Here the
products go to the tensor cores, ``tl.dot(weights, x)``, the weights as the [BLOCK_N, k]
operand and the input rows as a [k, COLS] operand padded with zeros to 16 (or 32) columns.
The padding is free (the tensor cores are idle at batch 1) and carries the groups: column
``m * NGT + t`` holds row m's inputs of the tile's t-th quantisation group and zeros elsewhere,
so one dot yields every group's partial sum separately and the scale and zero come after it,
per column:
    sum_k (q - z) s x = s (sum_k (q + 128) x - (z + 128) sum_k x)   per group.
A code becomes the bfloat16 number 128 + q by OR-ing it into the mantissa of 128 (0x4300): one
integer op, no conversion, exact; the offset comes out with the zero.

Layout (``pack``): codes [N, K] in bytes [N, K/2], K in chunks of 128: byte c (0 <= c < 64) of
chunk j holds k = 128 j + c in its low nibble and k = 128 j + 64 + c in its high one. A tile of
whole chunks then splits into two [BLOCK_N, 64 CHUNKS] operands by a mask and a shift, with
no reshuffle of elements (each byte gives one weight to each). Scales and zeros [N, G].

For bfloat16 the decode is PTX (``_split_bf16``): Triton keeps the codes' bytes in the
operand's register layout (loaded from shared memory, where its pipeline puts each tile) and
the asm turns two bytes into two pairs of bfloat16, four instructions per four weights; its own
int16 arithmetic took about twice as many. In SASS (sm_90) a tile of 64 rows x 512 inputs costs
about 730 instructions per thread, 2.8 per weight, against about 4.7 for the one-row kernel.

Measured on an H200 (bench/results/decode/h200_s16*/int4_mma.json): 0.9-1.6 TB/s at one row
(tinygemm 1.3-1.9: it stays the one-row path), 1.1-1.4 TB/s at eight rows where tinygemm
makes 0.67-0.80 and bf16 cuBLAS 3.4-3.9 (so 1.0-1.5x bf16's speed, not the 4x the bytes allow).

NF4 (``NF4=True``) uses the same layout with the codes' levels in place of 128 + code (by byte
permutes, ``_split_nf4_bf16``) and its absmax as the scale, no zero; not measured yet.

Reference: ``reference.dequant_int4`` / ``dequant_nf4`` (tests/test_quant_kernels.py checks
this kernel against them in float64 under the interpreter and on the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmopt.quant.kernels import MMA_CHUNK as CHUNK
from llmopt.quant.kernels import mma_layout_fits


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """codes [N, K] (integers 0..15, K a multiple of CHUNK), scales/zeros [G, N] into this
    kernel's layout: bytes [N, K/2] uint8, scales and zeros [N, G] (contiguous)."""
    n, k = codes.shape
    if k % CHUNK:
        raise ValueError(f"the tensor-core int4 layout needs K a multiple of {CHUNK}, got {k}")
    c = codes.to(torch.uint8).reshape(n, k // CHUNK, 2, CHUNK // 2)
    packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    return packed, scales.t().contiguous(), zeros.t().contiguous()


@triton.jit
def _split_bf16(b):
    """Each byte of b into two bfloat16, 128 + its low nibble and 128 + its high nibble: two
    bytes (one register) in, one pair out for each half: four instructions per four weights."""
    return tl.inline_asm_elementwise(
        """
        {
        .reg .b32 a;
        prmt.b32 a, $2, 0, 0x4140;
        lop3.b32 $0, a, 0x000F000F, 0x43004300, 0xEA;
        shr.u32 a, a, 4;
        lop3.b32 $1, a, 0x000F000F, 0x43004300, 0xEA;
        }
        """,
        "=r,=r,r", [b], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)


def nf4_split_asm() -> str:
    """PTX that turns two bytes of NF4 codes (the low 16 bits of $2) into the levels, rounded
    to bfloat16, of their low nibbles ($0, a pair) and of their high nibbles ($1), by byte
    permutes from the levels' high- and low-byte tables (``triton_wo.nf4_level_bytes_ptx``, which
    the one-row kernel's ``_nf4_prmt_asm`` uses too, for eight codes into float32), then two
    permutes interleave the bytes into the two pairs. 12 instructions per 4 weights, no memory
    access."""
    from llmopt.quant.kernels.triton_wo import nf4_level_bytes_ptx

    lines = ["{", ".reg .b32 s, sh, a, b, hh, ll;",
             "and.b32 s, $2, 0x7777;",
             "and.b32 sh, $2, 0x8888;",
             "shr.u32 sh, sh, 1;",
             "or.b32 sh, sh, 0x3210;",
             *nf4_level_bytes_ptx()]
    # nibbles 0-3 are byte 0's low and high, byte 1's low and high: pairs (0, 2) and (1, 3)
    lines += ["prmt.b32 $0, ll, hh, 0x6240;", "prmt.b32 $1, ll, hh, 0x7351;", "}"]
    return "\n".join(lines)


@triton.jit
def _split_nf4_bf16(b):
    """Each byte of b into the NF4 levels (bfloat16) of its low and of its high nibble, two bytes
    in, one pair out for each half. The PTX is ``nf4_split_asm()`` written out (a kernel names
    no module-level constant; a test checks the two agree)."""
    return tl.inline_asm_elementwise(
        """
        {
        .reg .b32 s, sh, a, b, hh, ll;
        and.b32 s, $2, 0x7777;
        and.b32 sh, $2, 0x8888;
        shr.u32 sh, sh, 1;
        or.b32 sh, sh, 0x3210;
        prmt.b32 a, 0xbebfbfbf, 0x00bdbebe, s;
        prmt.b32 b, 0x3e3e3e3d, 0x3f3f3f3e, s;
        prmt.b32 hh, a, b, sh;
        prmt.b32 a, 0xca063280, 0x00ba3d92, s;
        prmt.b32 b, 0xad7c25a3, 0x803910e2, s;
        prmt.b32 ll, a, b, sh;
        prmt.b32 $0, ll, hh, 0x6240;
        prmt.b32 $1, ll, hh, 0x7351;
        }
        """,
        "=r,=r,r", [b], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)


@triton.jit
def _int4_mma(
    x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, out_ptr, M, N, K, G, stride_xm,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, SPLIT_N: tl.constexpr,
    COLS: tl.constexpr, NF4: tl.constexpr = False,
):
    """x [M, K] against the packed codes into a zeroed float32 out [M, N]. A program owns one
    slice of K, 128 CHUNKS inputs (program_id 0), builds its expanded input operand once, then
    walks its share of the output tiles of BLOCK_N rows (program_id 1 of SPLIT_N), adding each
    tile's sums into out atomically."""
    HALF: tl.constexpr = 64
    BKB: tl.constexpr = HALF * CHUNKS
    SPAN: tl.constexpr = 2 * BKB
    NGT: tl.constexpr = SPAN // GROUP if SPAN >= GROUP else 1
    MR: tl.constexpr = COLS // NGT
    DT: tl.constexpr = x_ptr.dtype.element_ty
    MAGIC: tl.constexpr = 0x6400 if DT == tl.float16 else 0x4300
    OFF: tl.constexpr = 1024.0 if DT == tl.float16 else 128.0
    k0 = tl.program_id(0) * SPAN
    p = tl.arange(0, BKB)
    k_lo = (p // HALF) * (2 * HALF) + p % HALF
    k_hi = k_lo + HALF
    rows_m = tl.arange(0, MR)
    t_col = tl.arange(0, COLS) % NGT
    if SPAN >= GROUP:
        sel_lo = (k_lo // GROUP)[:, None] == t_col[None, :]
        sel_hi = (k_hi // GROUP)[:, None] == t_col[None, :]
        g = k0 // GROUP + t_col
    else:
        sel_lo = (k_lo * 0)[:, None] == t_col[None, :]
        sel_hi = sel_lo
        g = k0 // GROUP + t_col * 0
    xl = tl.load(x_ptr + rows_m[None, :] * stride_xm + (k0 + k_lo)[:, None],
                 mask=(rows_m < M)[None, :] & (k0 + k_lo < K)[:, None], other=0.0)
    xh = tl.load(x_ptr + rows_m[None, :] * stride_xm + (k0 + k_hi)[:, None],
                 mask=(rows_m < M)[None, :] & (k0 + k_hi < K)[:, None], other=0.0)
    xl = tl.where(sel_lo, tl.reshape(tl.broadcast_to(xl[:, :, None], (BKB, MR, NGT)), (BKB, COLS)), 0.0)
    xh = tl.where(sel_hi, tl.reshape(tl.broadcast_to(xh[:, :, None], (BKB, MR, NGT)), (BKB, COLS)), 0.0)
    sx = tl.sum(xl.to(tl.float32), axis=0) + tl.sum(xh.to(tl.float32), axis=0)  # [COLS]
    n_tiles = tl.cdiv(N, BLOCK_N)
    per = tl.cdiv(n_tiles, SPLIT_N)
    j0 = tl.program_id(1) * per
    j1 = tl.minimum(j0 + per, n_tiles)
    kb = k0 // 2 + p
    for j in range(j0, j1):
        offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b = tl.load(w_ptr + offs_n[:, None] * (K // 2) + kb[None, :],
                    mask=mask_n[:, None] & (kb < K // 2)[None, :], other=0)
        if NF4:  # the levels themselves; lut_ptr: the 16 levels, float32 (float16 inputs only)
            if DT == tl.bfloat16:
                lo, hi = _split_nf4_bf16(b)
            else:
                lo = tl.load(lut_ptr + (b & 0xF)).to(DT)
                hi = tl.load(lut_ptr + (b >> 4)).to(DT)
        elif DT == tl.bfloat16:
            lo, hi = _split_bf16(b)
        else:
            bi = b.to(tl.int16)
            lo = ((bi & 0xF) | MAGIC).to(DT, bitcast=True)  # OFF + code
            hi = ((bi >> 4) | MAGIC).to(DT, bitcast=True)
        d = tl.dot(lo, xl)
        d = tl.dot(hi, xh, d)
        gm = mask_n[:, None] & (g < G)[None, :]
        sc = tl.load(s_ptr + offs_n[:, None] * G + g[None, :], mask=gm, other=0.0).to(tl.float32)
        if NF4:  # w = level * absmax: the scale alone
            part = sc * d
        else:
            zp = tl.load(z_ptr + offs_n[:, None] * G + g[None, :], mask=gm, other=0.0).to(tl.float32)
            part = sc * (d - (zp + OFF) * sx[None, :])
        res = tl.sum(tl.reshape(part, (BLOCK_N, MR, NGT)), axis=2)
        tl.atomic_add(out_ptr + rows_m[None, :] * N + offs_n[:, None], res,
                      mask=mask_n[:, None] & (rows_m < M)[None, :], sem="relaxed")


# (BLOCK_N, CHUNKS, SPLIT_N, num_warps, num_stages). A first version looped along K inside each
# program (grid over output tiles and K splits) and rebuilt the input operand every iteration:
# 0.48-0.83x bf16 cuBLAS on every 7B shape, against 0.88-1.54x for this one
# (bench/results/decode/h200_s16a/int4_mma_g128.json). Storing each K slice's sums for the caller
# to add (no atomics, no zeroed buffer) instead: 5-15% slower alone, level in the compiled 7B
# model at batch 8 (243.2 tok/s against 243.7; h200_s16d).
TILES = [(64, 4, 16, 4, 3), (64, 4, 32, 4, 3), (64, 2, 16, 4, 3), (64, 2, 32, 4, 4),
         (128, 4, 16, 8, 3), (64, 4, 64, 4, 3), (64, 2, 64, 4, 4), (128, 2, 32, 8, 3),
         (64, 1, 32, 4, 4), (64, 1, 64, 4, 4), (128, 1, 32, 8, 4)]
MAX_COLS = 32


def _autotuner(cap: int):  # noqa: ANN202 - triton's Autotuner
    configs = [triton.Config({"BLOCK_N": bn, "CHUNKS": c, "SPLIT_N": sn}, num_warps=w, num_stages=st)
               for bn, c, sn, w, st in TILES if c <= cap]
    return triton.autotune(configs=configs, key=["M", "N", "K", "GROUP", "COLS", "NF4"],
                           reset_to_zero=["out_ptr"])(_int4_mma)


# One autotuner per cap on CHUNKS: a tile of CHUNKS chunks holds up to 128 CHUNKS / GROUP groups,
# each taking a column per input row, so more rows or smaller groups take narrower tiles.
_KERNELS = {cap: _autotuner(cap) for cap in (4, 2, 1)}


def plan(m: int, group: int) -> tuple[int, int] | None:
    """(cap on CHUNKS, COLS) for m rows of groups of ``group``: the widest tiles whose columns
    (m rows x groups per tile) fit in MAX_COLS; None where even one chunk's do not."""
    for cap in (4, 2, 1):
        need = m * max(1, cap * CHUNK // group)
        if need <= MAX_COLS:
            return cap, max(16, triton.next_power_of_2(need))
    return None


def fits(m: int, in_features: int, group: int) -> bool:
    """Shapes this kernel takes: the layout's (``kernels.mma_layout_fits``) and m rows that fit
    the columns."""
    return mma_layout_fits(in_features, group) and plan(m, group) is not None


def int4_mma(x: torch.Tensor, packed: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
             group: int) -> torch.Tensor:
    """x [..., K] (rows that ``fits``) against ``pack``'s layout; returns x's dtype."""
    return _mma(x, packed, scales_t, zeros_t, scales_t, group, False)


def nf4_mma(x: torch.Tensor, packed: torch.Tensor, absmax_t: torch.Tensor, block: int,
            lut: torch.Tensor) -> torch.Tensor:
    """x [..., K] against NF4 codes in ``pack``'s layout (absmax [N, G] in place of the scales,
    no zeros); ``lut`` the 16 levels (float32, read for float16 inputs)."""
    return _mma(x, packed, absmax_t, absmax_t, lut, block, True)


def _mma(x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, z: torch.Tensor, lut: torch.Tensor,
         group: int, nf4: bool) -> torch.Tensor:
    k = x.shape[-1]
    n = packed.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    planned = plan(m, group)
    assert planned is not None, (m, group)
    cap, cols = planned
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    _KERNELS[cap][lambda meta: (triton.cdiv(k, CHUNK * meta["CHUNKS"]), meta["SPLIT_N"])](
        x2, packed, s, z, lut, out, m, n, k, s.shape[1], x2.stride(0), GROUP=group, COLS=cols, NF4=nf4)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
