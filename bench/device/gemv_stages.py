"""The one-row weight-only kernels (``quant/kernels/triton_wo.py``: ``_packed_gemv1`` for int4 and
NF4, ``_rowmajor_gemv1`` for int8 and fp8) with their K loop software-pipelined
(``STAGES``, LLMOPT_GEMV_STAGES) against the plain loop, tile by tile, on Llama-2-7B's shapes as
the model calls them (q/k/v and gate/up fused): microseconds per call and bytes per second, with
torch's int4 GEMM (tinygemm, int4's default) and bf16 cuBLAS beside them (issue 4).

    python bench/device/gemv_stages.py --out $OUT/gemv_stages.json [--stages 0 3 5] [--formats ...]

Every config is checked against float64 dequantise-then-matmul before it is timed (relative
error < 1e-2), so a fast wrong config cannot score. A call is what ``triton_wo._gemv1`` does
for that config: for the packed formats a zeroed float32 output (split-K sums are added
atomically) and the cast to bfloat16 after it.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # (N, K): q/k/v, o, gate/up, down
FORMATS = ("int4-g128", "int4-g32", "nf4", "int8", "fp8")


def _packed_call(T, x2, w, s, z, lut, n, k, fmt, group, nf4_dec, cfg, stages):
    out = torch.zeros((n,), device=x2.device, dtype=torch.float32)
    bn, bk, sk, warps = cfg
    T._packed_gemv1[(triton.cdiv(n, bn), sk)](x2, w, s, z, lut, out, n, k, 15, FMT=fmt, GROUP=group, BLOCK_N=bn,
                                              BLOCK_K=bk, SPLIT_K=sk, NF4_DECODE=nf4_dec, INT_DECODE=1,
                                              STAGES=stages, num_warps=warps)
    return out.to(x2.dtype)


def _rowmajor_call(T, x2, w, s, n, k, fmt, cfg, stages):
    out = torch.empty((n,), device=x2.device, dtype=x2.dtype)
    bn, bk, warps = cfg
    T._rowmajor_gemv1[(triton.cdiv(n, bn),)](x2, w, s, out, n, k, FMT=fmt, BLOCK_N=bn, BLOCK_K=bk,
                                             INT_DECODE=1, STAGES=stages, num_warps=warps)
    return out


def main() -> int:
    from int4_mma import _measure
    from wo_kernels import _copies, _time_us, _tinygemm, save

    from llmopt.devices import copy_bandwidth
    from llmopt.quant.kernels import triton_wo as T
    from test_quant_kernels import _dequant, _formats, _gemv_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--stages", type=int, nargs="+", default=[0, 3, 5])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--rotate-mb", type=float, default=200.0)
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new formats after this long")
    args = p.parse_args()
    torch.manual_seed(0)
    copy = copy_bandwidth(torch.device("cuda")) / 1e9
    t0 = time.time()
    rows_out: list[dict] = []
    for n, k in SHAPES:  # bf16 cuBLAS once per shape
        w = torch.randn(n, k, device="cuda").to(torch.bfloat16)
        x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
        us = _time_us([partial(F.linear, x, c[0]) for c in _copies((w,), 2 * n * k, args.rotate_mb)])
        rows_out.append({"format": "bf16", "shape": [n, k], "kernel": "cublas", "us": us, "bytes": 2 * n * k,
                         "gb_per_s": 2 * n * k / us / 1e3})
    for name in args.formats:
        if time.time() - t0 > args.budget_s:
            rows_out.append({"format": name, "error": "skipped: --budget-s spent"})
            continue
        fmt_key, group = (name.split("-g")[0], int(name.split("-g")[1])) if "-g" in name else (name, 64)
        for n, k in SHAPES:
            w = torch.randn(n, k, device="cuda") * 0.02
            fargs = _formats(w, group)[fmt_key]
            fargs = tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() and a.element_size() > 1
                          else a for a in fargs)
            x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
            expect = x.double() @ _dequant(fmt_key, fargs, k).t()
            nbytes = sum(a.numel() * a.element_size() for a in fargs if torch.is_tensor(a))
            copies = _copies(fargs, nbytes, args.rotate_mb)
            packed = fmt_key in ("int4", "nf4")
            cands: dict[str, list] = {}
            if fmt_key == "int4":
                tg = [_tinygemm(x, c, n, k) for c in copies]
                if tg[0] is not None:
                    cands["tinygemm"] = tg
            for cfg in T.ONE_ROW_TILES["packed" if packed else "rowmajor"]:
                for st in args.stages:
                    fns = []
                    for c in copies:
                        wq, s, z, lut, fmt, grp = _gemv_args(fmt_key, c)
                        if packed:
                            fns.append(partial(_packed_call, T, x, wq, s, z, lut, n, k, fmt, grp,
                                               T.NF4_DECODES["prmt"], cfg, st))
                        else:
                            fns.append(partial(_rowmajor_call, T, x, wq, s, n, k, fmt, cfg, st))
                    cands[f"tile{list(cfg)}-st{st}"] = fns
            for kname, fns in cands.items():
                r = _measure({"format": name, "shape": [n, k], "kernel": kname}, fns, expect, nbytes)
                rows_out.append(r)
            best = {}
            for r in rows_out:
                if r.get("format") == name and r.get("shape") == [n, k] and "us" in r:
                    tag = r["kernel"].split("-st")[-1] if "-st" in r["kernel"] else r["kernel"]
                    if tag not in best or r["us"] < best[tag][0]:
                        best[tag] = (r["us"], r["kernel"])
            print(f"{name} {n}x{k}: " + ", ".join(f"{t} {u:.1f} us ({kn})" for t, (u, kn) in sorted(best.items())),
                  flush=True)
        save(args.out, rows_out, copy, stages=args.stages)
    save(args.out, rows_out, copy, stages=args.stages)
    print(f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
