"""Plot decode tokens/s against the memory-bandwidth roofline from committed `llmopt bench` JSONs.

    python bench/plot_decode.py [--out docs/decode_roofline.png] [JSON ...]
        (default: every bench/results/decode/*.json, and the runs of the folders in DEFAULTS_RUNS)

Each bar pair is one run: the roofline (bytes read per step / the copy bandwidth measured in the
same run) and the measured decode tokens/s, labelled with the fraction. Needs matplotlib
(`pip install -e .[plot]`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Later sessions keep each device call's runs in a folder; these hold the current defaults' runs.
DEFAULTS_RUNS = ("h200_s14d",)


def _kernel(r: dict) -> str | None:
    """The weight-only kernel of a quantised run: recorded (``wo_kernel``, or the environment
    switch), else the default when it ran: Triton before the regional compile mode existed,
    tinygemm for int4 (Triton for the rest) after."""
    if not r.get("quant"):
        return None
    kernel = r.get("wo_kernel") or (r.get("env") or {}).get("LLMOPT_WO_KERNEL")
    if kernel is None:
        kernel = "tinygemm" if r.get("compile_mode") == "regional" else "triton"
    if kernel == "tinygemm" and not str(r["quant"]).startswith("int4"):
        kernel = "triton"  # tinygemm takes int4 only
    return kernel


def _label(r: dict) -> str:
    model = str(r.get("model", "?")).removeprefix("preset:")
    quant = r.get("quant") or "bf16"
    kernel = _kernel(r)
    if kernel:
        quant = f"{quant} ({kernel})"
    gpu = str(r.get("device", "")).replace("NVIDIA ", "")
    cfg = r.get("config") or {}
    mode = {"regional": "regional", "reduce-overhead": "whole"}.get(r.get("compile_mode"), r.get("compile_mode"))
    extra = f", ctx {cfg['prompt_len']}" if cfg.get("prompt_len", 5) > 5 else ""
    extra += ", fused" if r.get("fuse_projections") else ""
    extra += {"out": ", o/down one-row", "all": ", all one-row"}.get(r.get("dense_gemv"), "")
    st = r.get("inductor_settings")  # recorded since the ninth session: PDL, wider autotuning
    if st:
        extra += ", " + ("+".join(k for k, key in (("PDL", "pdl"), ("apw", "autotune_pointwise")) if st[key]) or "no PDL/apw")
    return f"{model} {quant}, b{cfg.get('batch_size', 1)}{extra}, {mode}, {gpu}"


def load_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for p in paths:
        r = json.loads(p.read_text())
        if not r.get("roofline_tokens_per_s") or not r.get("decode_tokens_per_s"):
            continue  # CPU runs and runs without a copy-bandwidth measurement
        runs.append(r)
    return sorted(runs, key=lambda r: r["decode_tokens_per_s"])


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(r) for r in runs]
    roof = [r["roofline_tokens_per_s"] for r in runs]
    got = [r["decode_tokens_per_s"] for r in runs]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(runs) + 2.0))
    y = range(len(runs))
    ax.barh(y, roof, color="#d9d9d9", label="roofline (bytes per step / measured copy bandwidth)")
    ax.barh(y, got, height=0.5, color="#1f77b4", label="measured decode tokens/s")
    for i, (g, rf) in enumerate(zip(got, roof, strict=True)):
        ax.text(g, i, f" {g:.0f} ({100 * g / rf:.0f}%)", va="center", fontsize=8)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_xlabel("decode tokens/s per sequence (random-weight presets)")
    ax.set_title("llmopt decode against the memory-bandwidth roofline")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "decode_roofline.png")
    args = p.parse_args()
    decode = ROOT / "bench" / "results" / "decode"
    paths = args.json or sorted(decode.glob("*.json")) + [p for d in DEFAULTS_RUNS for p in sorted((decode / d).glob("*.json"))]
    runs = load_runs(paths)
    if not runs:
        print("plot_decode: no GPU decode JSON with a roofline among the inputs", file=sys.stderr)
        return 2
    try:
        plot(runs, args.out)
    except ImportError:
        print("plot_decode: matplotlib is not installed (pip install -e .[plot])", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
