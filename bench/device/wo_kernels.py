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
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # test modules import ``tests.*``

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): q/k/v/o, gate/up, down


def _time_us(fns: list, iters: int = 200) -> float:
    """Microseconds per call of the callables in ``fns`` (one per copy of the weights), replayed
    from a CUDA graph (launch overhead out, as in decode) that calls them in turn: with enough
    copies (``--rotate-mb``) each call reads its weights from memory, not from the 50 MB L2
    cache a single repeated weight would sit in."""
    for fn in fns * 2:
        fn()
    torch.cuda.synchronize()
    per_graph = max(20, len(fns))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(per_graph):
            fns[i % len(fns)]()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    torch.cuda.synchronize()
    reps = max(1, iters // per_graph)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * per_graph)


def _copies(args: tuple, nbytes: int, rotate_mb: float) -> list[tuple]:
    """``args`` and enough clones of its tensors that all together exceed ``rotate_mb``."""
    count = max(1, int(rotate_mb * 1e6 // max(nbytes, 1)) + 1) if rotate_mb > 0 else 1
    return [args] + [tuple(a.clone() if torch.is_tensor(a) else a for a in args) for _ in range(count - 1)]


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


def save(out: str, cases: list[dict], copy: float, **extra: object) -> None:
    """The cases as JSON at ``out``, with the command, device and copy bandwidth."""
    result = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "copy_gb_per_s": copy, **extra, "cases": cases}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"copy {copy:.0f} GB/s")


def main() -> int:
    from llmopt.quant.kernels import triton_wo as T
    from test_quant_kernels import _dequant, _formats, _gemv_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--rotate-mb", type=float, default=200.0,
                   help="cycle through copies of each weight totalling this many MB (0: one copy, L2-resident)")
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
            bf16s = [c[0] for c in _copies((bf16,), 2 * n * k, args.rotate_mb)]
            base_us = _time_us([partial(F.linear, x, b) for b in bf16s])
            rows_out.append({"shape": [n, k], "rows": m, "format": "bf16", "kernel": "cublas", "us": base_us,
                             "bytes": 2 * n * k, "gb_per_s": 2 * n * k / base_us / 1e3})
            if m <= 8:  # the few-row kernel on unquantised weights: could it replace cuBLAS?
                expect = x.double() @ bf16.double().t()
                for kname, kw in (("triton-gemv", {"one_row": "reduce"}), ("gemv1", {"one_row": "deferred"})):
                    if kname == "gemv1" and m > 1:
                        continue
                    dense = [partial(T.gemv, x, b, b, b, b, T.FMT_DENSE, 1 << 30, **kw) for b in bf16s]
                    err = ((dense[0]().double() - expect).norm() / expect.norm()).item()
                    us = _time_us(dense)
                    rows_out.append({"shape": [n, k], "rows": m, "format": "bf16", "kernel": kname,
                                     "us": us, "bytes": 2 * n * k, "gb_per_s": 2 * n * k / us / 1e3,
                                     "vs_bf16": base_us / us, "relative_error": err})
            for fmt, fargs in formats.items():
                fargs = tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point()
                              and a.element_size() > 1 else a for a in fargs)
                expect = x.double() @ _dequant(fmt, fargs, k).t()
                nbytes = sum(a.numel() * a.element_size() for a in fargs if torch.is_tensor(a))
                matmul = {"int8": T.int8_matmul, "int8g": T.int8g_matmul, "int4": T.int4_matmul,
                          "nf4": T.nf4_matmul, "fp8": T.fp8_matmul}[fmt]
                copies = _copies(fargs, nbytes, args.rotate_mb)
                cands = {"triton": [partial(matmul, x, *c) for c in copies]}
                if m <= 8:  # the few-row kernels take up to 8 rows
                    cands["triton-gemv"] = [partial(T.gemv, x, *_gemv_args(fmt, c), one_row="reduce") for c in copies]
                if m == 1 and fmt != "int8g":  # the deferred-sum one-row kernels, both integer decodes
                    for dec in T.DECODES:
                        cands[f"gemv1-{dec}"] = [partial(T.gemv, x, *_gemv_args(fmt, c), one_row="deferred",
                                                         int_decode=dec) for c in copies]
                if m == 1 and fmt == "nf4":  # NF4 levels by selects and by byte permutes (LLMOPT_NF4_DECODE)
                    for nd in ("select", "prmt"):
                        cands[f"gemv1-{nd}"] = [partial(T.gemv, x, *_gemv_args(fmt, c), one_row="deferred",
                                                        nf4_decode=nd) for c in copies]
                if fmt == "int4":
                    tg = [_tinygemm(x, c, n, k) for c in copies]
                    cands["tinygemm"] = None if tg[0] is None else tg
                for name, fns in cands.items():
                    if fns is None:
                        rows_out.append({"shape": [n, k], "rows": m, "format": fmt, "kernel": name,
                                         "error": "not available here (LLMOPT_WO_KERNEL, torch or shape)"})
                        continue
                    try:
                        y = fns[0]()
                        err = ((y.double() - expect).norm() / expect.norm()).item()
                        if err > 1e-2:
                            rows_out.append({"shape": [n, k], "rows": m, "format": fmt, "kernel": name,
                                             "error": f"relative error {err:.3g}"})
                            continue
                        us = _time_us(fns)
                    except Exception as e:  # one failing kernel must not lose the others
                        rows_out.append({"shape": [n, k], "rows": m, "format": fmt, "kernel": name,
                                         "error": f"{type(e).__name__}: {str(e)[:200]}"})
                        continue
                    rows_out.append({"shape": [n, k], "rows": m, "format": fmt, "kernel": name, "us": us,
                                     "bytes": nbytes, "gb_per_s": nbytes / us / 1e3, "vs_bf16": base_us / us})
                print(f"{n}x{k} rows={m} {fmt} done", file=sys.stderr, flush=True)
    save(args.out, rows_out, copy, group=args.group)
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
