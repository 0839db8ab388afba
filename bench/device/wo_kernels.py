"""Weight-only kernels alone, on Llama-2-7B's layer shapes: microseconds per call and the bytes they
stream per second, against bf16 and the device's copy bandwidth (issue 4). Seconds on a GPU, so a
kernel change can be measured inside one short device call.

    python bench/device/wo_kernels.py --out $OUT/wo_kernels.json [--rows 1 8]

Every case is checked against float64 dequantise-then-matmul before it is timed (relative error
< 1e-2), so a fast wrong kernel cannot score.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): q/k/v/o, gate/up, down


def _time_us(fn, iters: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()  # replay from a graph: launch overhead out, as in decode
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters // 20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (iters // 20 * 20)


def _tinygemm(x: torch.Tensor, fargs: tuple, n: int, k: int):
    """torch's int4 GEMM on the same codes, repacked by Int4Linear.prepare_for_device (None where
    that path is off, LLMOPT_WO_KERNEL naming another, or the shape does not fit it)."""
    from llmopt.quant.kernels import int4_linear_tinygemm
    from llmopt.quant.linear import Int4Linear

    lin = Int4Linear(k, n, False, fargs[3], 4, False, x.device, torch.bfloat16)
    lin.qweight, lin.scales, lin.zeros = fargs[0], fargs[1], fargs[2]
    lin.prepare_for_device()
    if lin.tg_weight is None:
        return None
    return partial(int4_linear_tinygemm, x, lin.tg_weight, lin.tg_scales_zeros, fargs[3])


def main() -> int:
    from llmopt.quant.kernels import triton_wo as T
    from test_quant_kernels import _dequant, _formats, _gemv_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--group", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    from llmopt.devices import copy_bandwidth

    copy = copy_bandwidth(torch.device("cuda")) / 1e9  # the figure llmopt bench reports
    rows_out = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda") * 0.02
        formats = _formats(w, args.group)
        bf16 = w.to(torch.bfloat16)
        for m in args.rows:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            base_us = _time_us(partial(F.linear, x, bf16))
            rows_out.append({"shape": [n, k], "rows": m, "format": "bf16", "kernel": "cublas", "us": base_us,
                             "bytes": 2 * n * k, "gb_per_s": 2 * n * k / base_us / 1e3})
            if m <= 8:  # the few-row kernel on unquantised weights: could it replace cuBLAS?
                dense = partial(T.gemv, x, bf16, bf16, bf16, bf16, T.FMT_DENSE, 1 << 30)
                expect = x.double() @ bf16.double().t()
                err = ((dense().double() - expect).norm() / expect.norm()).item()
                us = _time_us(dense)
                rows_out.append({"shape": [n, k], "rows": m, "format": "bf16", "kernel": "triton-gemv",
                                 "us": us, "bytes": 2 * n * k, "gb_per_s": 2 * n * k / us / 1e3,
                                 "vs_bf16": base_us / us, "relative_error": err})
            for fmt, fargs in formats.items():
                fargs = tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point()
                              and a.element_size() > 1 else a for a in fargs)
                expect = x.double() @ _dequant(fmt, fargs, k).t()
                nbytes = sum(a.numel() * a.element_size() for a in fargs if torch.is_tensor(a))
                matmul = {"int8": T.int8_matmul, "int8g": T.int8g_matmul, "int4": T.int4_matmul,
                          "nf4": T.nf4_matmul, "fp8": T.fp8_matmul}[fmt]
                cands = {"triton": partial(matmul, x, *fargs)}
                if m <= 8:  # the few-row kernels take up to 8 rows
                    cands["triton-gemv"] = partial(T.gemv, x, *_gemv_args(fmt, fargs))
                if fmt == "int4":
                    cands["tinygemm"] = _tinygemm(x, fargs, n, k)
                for name, fn in cands.items():
                    if fn is None:
                        rows_out.append({"shape": [n, k], "rows": m, "format": fmt, "kernel": name,
                                         "error": "not available here (LLMOPT_WO_KERNEL, torch or shape)"})
                        continue
                    try:
                        y = fn()
                        err = ((y.double() - expect).norm() / expect.norm()).item()
                        if err > 1e-2:
                            rows_out.append({"shape": [n, k], "rows": m, "format": fmt, "kernel": name,
                                             "error": f"relative error {err:.3g}"})
                            continue
                        us = _time_us(fn)
                    except Exception as e:  # one failing kernel must not lose the others
                        rows_out.append({"shape": [n, k], "rows": m, "format": fmt, "kernel": name,
                                         "error": f"{type(e).__name__}: {str(e)[:200]}"})
                        continue
                    rows_out.append({"shape": [n, k], "rows": m, "format": fmt, "kernel": name, "us": us,
                                     "bytes": nbytes, "gb_per_s": nbytes / us / 1e3, "vs_bf16": base_us / us})
                print(f"{n}x{k} rows={m} {fmt} done", file=sys.stderr, flush=True)
    result = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "copy_gb_per_s": copy, "group": args.group, "cases": rows_out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"copy {copy:.0f} GB/s")
    print(f"{'shape':>12} {'rows':>4} {'format':>6} {'kernel':>12} {'us':>8} {'GB/s':>7} {'% copy':>6} {'vs bf16':>7}")
    for r in rows_out:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        if "error" in r:
            print(f"{shape:>12} {r['rows']:>4} {r['format']:>6} {r['kernel']:>12} {r['error']}")
            continue
        print(f"{shape:>12} {r['rows']:>4} {r['format']:>6} {r['kernel']:>12} {r['us']:8.1f} {r['gb_per_s']:7.0f} "
              f"{100 * r['gb_per_s'] / copy:6.1f} {r.get('vs_bf16', 1.0):7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
