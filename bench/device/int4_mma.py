"""The tensor-core int4 kernels (``quant/kernels/triton_int4_mma.py``) alone against torch's int4
GEMM (tinygemm, the default CUDA path), the one-row Triton kernel and bf16 cuBLAS, on Llama-2-7B's
layer shapes and its fused q/k/v and gate/up shapes: microseconds per call and bytes streamed per
second (issue 4). Every case is checked against float64 dequantise-then-matmul first.

    python bench/device/int4_mma.py --out $OUT/int4_mma.json [--rows 1 8] [--groups 128 32]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (22016, 4096)]


def main() -> int:
    from wo_kernels import _copies, _time_us, _tinygemm, save

    from llmopt.devices import copy_bandwidth
    from llmopt.quant import primitives as P
    from llmopt.quant.kernels import reference as ref
    from llmopt.quant.kernels import triton_int4_mma as MMA
    from llmopt.quant.kernels import triton_wo as T

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 16])
    p.add_argument("--groups", type=int, nargs="+", default=[128, 32])
    p.add_argument("--rotate-mb", type=float, default=200.0)
    p.add_argument("--nf4", action="store_true", help="also NF4 (blocks of 64): the kernel against the default path")
    args = p.parse_args()
    torch.manual_seed(0)
    copy = copy_bandwidth(torch.device("cuda")) / 1e9
    rows_out = []
    for group in args.groups:
        for n, k in SHAPES:
            w = torch.randn(n, k, device="cuda") * 0.02
            prm = P.group_minmax_params(w, 4, group)
            codes = P.quantize_groupwise(w, prm, 4, group)
            sc = prm.scales.t().contiguous().to(torch.bfloat16)
            zs = prm.zeros.t().contiguous().to(torch.bfloat16)
            qw = P.pack_bits(codes.t().contiguous(), 4)
            deq = ref.dequant_int4(qw, sc, zs, group, k, torch.float64)
            packed, st, zt = MMA.pack(codes, sc, zs)
            nbytes = packed.numel() + 2 * st.numel() * 2
            bf16 = w.to(torch.bfloat16)
            for m in args.rows:
                x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
                expect = x.double() @ deq.t()
                bf16s = [c[0] for c in _copies((bf16,), 2 * n * k, args.rotate_mb)]
                base_us = _time_us([partial(F.linear, x, b) for b in bf16s])
                rows_out.append({"group": group, "shape": [n, k], "rows": m, "kernel": "bf16-cublas", "us": base_us,
                                 "bytes": 2 * n * k, "gb_per_s": 2 * n * k / base_us / 1e3})
                mma_copies = _copies((packed, st, zt), nbytes, args.rotate_mb)
                old_copies = _copies((qw, sc, zs, group), nbytes, args.rotate_mb)
                cands = {
                    "mma": [partial(MMA.int4_mma, x, *c, group) for c in mma_copies] if MMA.fits(m, k, group) else [None],
                    "tinygemm": [_tinygemm(x, c, n, k) for c in old_copies],
                }
                if m == 1:
                    cands["gemv1-magic"] = [partial(T.gemv, x, c[0], c[1], c[2], c[1], T.FMT_INT4, group,
                                                    one_row="deferred", int_decode="magic") for c in old_copies]
                for name, fns in cands.items():
                    r = _measure({"group": group, "shape": [n, k], "rows": m, "kernel": name},
                                 fns if fns[0] is not None else None, expect, nbytes)
                    kern = MMA._KERNELS[MMA.plan(m, group)[0]] if name == "mma" and "us" in r else None
                    if kern is not None and kern.best_config is not None:
                        r["config"] = {**kern.best_config.kwargs, "num_warps": kern.best_config.num_warps,
                                       "num_stages": kern.best_config.num_stages}
                    if "us" in r:
                        r["vs_bf16"] = base_us / r["us"]
                    rows_out.append(r)
                print(f"g{group} {n}x{k} rows={m} done", file=sys.stderr, flush=True)
    if args.nf4:
        rows_out += _nf4_cases(args.rows, args.rotate_mb)
    save(args.out, rows_out, copy)
    print(f"{'g':>4} {'shape':>12} {'rows':>4} {'kernel':>12} {'us':>8} {'GB/s':>7} {'% copy':>6} {'vs bf16':>7}  config")
    for r in rows_out:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        head = f"{r['group']:>4} {shape:>12} {r['rows']:>4} {r['kernel']:>12}"
        if "error" in r:
            print(f"{head} {r['error']}")
            continue
        print(f"{head} {r['us']:8.1f} {r['gb_per_s']:7.0f} {100 * r['gb_per_s'] / copy:6.1f} "
              f"{r.get('vs_bf16', 1.0):7.2f}  {r.get('config') or ''}")
    return 0


def _nf4_cases(rows: list[int], rotate_mb: float) -> list[dict]:
    """NF4 with blocks of 64 through the tensor-core kernel and through the default path
    (``nf4_matmul`` as ``auto`` calls it: the one-row kernel at one row, the tiled one above)."""
    from wo_kernels import _copies

    from llmopt.quant import primitives as P
    from llmopt.quant.kernels import reference as ref
    from llmopt.quant.kernels import triton_int4_mma as MMA
    from llmopt.quant.kernels import triton_wo as T

    out = []
    lut = P.nf4_codebook().cuda()
    for n, k in SHAPES:
        nf = P.quantize_nf4(torch.randn(n, k, device="cuda") * 0.02, 64)
        absmax = nf.absmax.t().contiguous().to(torch.bfloat16)
        qw = P.pack_bits(nf.codes.t().contiguous(), 4)
        deq = ref.dequant_nf4(qw, absmax, 64, k, torch.float64)
        packed, at, _ = MMA.pack(nf.codes, absmax, absmax)
        nbytes = packed.numel() + 2 * at.numel()
        for m in rows:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            expect = x.double() @ deq.t()
            cands = {"nf4-mma": [partial(MMA.nf4_mma, x, c[0], c[1], 64, lut)
                                 for c in _copies((packed, at), nbytes, rotate_mb)] if MMA.fits(m, k, 64) else None,
                     "nf4-default": [partial(T.nf4_matmul, x, c[0], c[1], 64, lut, gemv_rows=1)
                                     for c in _copies((qw, absmax), nbytes, rotate_mb)]}
            for name, fns in cands.items():
                out.append(_measure({"group": 64, "shape": [n, k], "rows": m, "kernel": name}, fns, expect, nbytes))
    return out


def _measure(row: dict, fns: list | None, expect: torch.Tensor, nbytes: int) -> dict:
    """``row`` with the microseconds per call of ``fns`` (copies of one call) and the bytes per
    second, or an error: none to run, a relative error above 1e-2 against ``expect``, or what
    the call raised (one failing kernel must not lose the others)."""
    from wo_kernels import _time_us

    if fns is None:
        return {**row, "error": "not available"}
    try:
        err = ((fns[0]().double() - expect).norm() / expect.norm()).item()
        if err > 1e-2:
            return {**row, "error": f"relative error {err:.3g}"}
        us = _time_us(fns)
    except Exception as e:
        return {**row, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {**row, "us": us, "bytes": nbytes, "gb_per_s": nbytes / us / 1e3, "relative_error": err}


if __name__ == "__main__":
    raise SystemExit(main())
