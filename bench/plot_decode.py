"""Plot decode tokens/s against the memory-bandwidth roofline from committed `llmopt bench` JSONs.

    python bench/plot_decode.py [--out docs/decode_roofline.png] [--all] [JSON ...]

By default: every `llmopt bench` JSON under bench/results/decode (folders included), one bar pair
per configuration (model, format, batch size, context), from the run with the most tokens/s:
the roofline (bytes read per step / the copy bandwidth measured in that run) in grey, the
measured decode tokens/s in blue, labelled with the fraction and the run's file, and the issues'
target as a red mark where one applies. Runs of fewer than 100 new tokens (time-to-first-token
runs) are left out. ``--all``: every run its own bar (or the JSONs named). Needs matplotlib
(`pip install -e .[plot]`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DECODE = ROOT / "bench" / "results" / "decode"
# The issues' targets (set on an H100): a fraction of the roofline for bf16 (issue 3), tokens/s
# per sequence otherwise (issues 3 and 4); keyed by (model, format, batch size, context).
TARGET_FRACTION = {("llama-2-7b", "bf16", 1, "short"): 0.90, ("llama-2-7b", "bf16", 1, "4k"): 0.85}
TARGET_TPS = {("llama-3-8b", "bf16", 1, "short"): 180.0, ("llama-2-7b", "int8", 1, "short"): 340.0,
              ("llama-2-7b", "fp8", 1, "short"): 340.0, ("llama-2-7b", "int4-g128", 1, "short"): 480.0,
              ("llama-2-7b", "int4-g32", 1, "short"): 450.0, ("llama-2-7b", "nf4", 1, "short"): 400.0}


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
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(r, dict) or not r.get("roofline_tokens_per_s") or not r.get("decode_tokens_per_s"):
            continue  # other JSONs, CPU runs and runs without a copy-bandwidth measurement
        r["_file"] = str(p.relative_to(DECODE)) if p.is_relative_to(DECODE) else p.name
        runs.append(r)
    return sorted(runs, key=lambda r: r["decode_tokens_per_s"])


def config_key(r: dict) -> tuple[str, str, int, str]:
    cfg = r.get("config") or {}
    ctx = "short" if cfg.get("prompt_len", 5) <= 64 else ("4k" if cfg["prompt_len"] >= 3000 else str(cfg["prompt_len"]))
    tp = f" tp{r['tp']}" if r.get("tp", 1) > 1 else ""
    return (str(r.get("model", "?")).removeprefix("preset:"), (r.get("quant") or "bf16") + tp,
            int(cfg.get("batch_size", 1)), ctx)


def best_per_config(runs: list[dict]) -> list[dict]:
    """The run with the most tokens/s per configuration, each with its run count and target."""
    best: dict[tuple, dict] = {}
    count: dict[tuple, int] = {}
    for r in runs:
        if (r.get("config") or {}).get("new_tokens", 200) < 100:
            continue  # time-to-first-token runs
        k = config_key(r)
        count[k] = count.get(k, 0) + 1
        if k not in best or r["decode_tokens_per_s"] > best[k]["decode_tokens_per_s"]:
            best[k] = r
    out = []
    bf16_b8 = best.get(("llama-2-7b", "bf16", 8, "short"))
    for k, r in best.items():
        model, fmt, batch, ctx = k
        target = TARGET_TPS.get(k)
        if k in TARGET_FRACTION:
            target = TARGET_FRACTION[k] * r["roofline_tokens_per_s"]
        if batch == 8 and fmt.startswith(("int4", "nf4")) and bf16_b8:
            target = 2 * bf16_b8["decode_tokens_per_s"]  # issue 4: 2x bf16 at batch 8
        label = f"{model} {fmt}, b{batch}" + ("" if ctx == "short" else f", ctx {ctx}")
        out.append({**r, "_label": f"{label} (best of {count[k]})", "_target": target})
    return sorted(out, key=lambda r: r["decode_tokens_per_s"])


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.get("_label") or _label(r) for r in runs]
    roof = [r["roofline_tokens_per_s"] for r in runs]
    got = [r["decode_tokens_per_s"] for r in runs]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(runs) + 2.2))
    y = range(len(runs))
    ax.barh(y, roof, color="#d9d9d9", label="roofline (bytes per step / measured copy bandwidth)")
    ax.barh(y, got, height=0.5, color="#1f77b4", label="measured decode tokens/s")
    targets = [(i, r["_target"]) for i, r in enumerate(runs) if r.get("_target")]
    if targets:
        ax.scatter([t for _, t in targets], [i for i, _ in targets], marker="|", s=300, color="#d62728",
                   zorder=3, label="issue target")
    for i, (g, rf, r) in enumerate(zip(got, roof, runs, strict=True)):
        note = f"  {r['_file']}" if "_file" in r and "_label" in r else ""
        ax.text(g, i, f" {g:.0f} ({100 * g / rf:.0f}%){note}", va="center", fontsize=7)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_xlabel("decode tokens/s per sequence (random-weight presets; H200s, targets set on an H100)")
    ax.set_title("llmopt decode against the memory-bandwidth roofline")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "decode_roofline.png")
    p.add_argument("--all", action="store_true", help="a bar pair per run, not per configuration")
    args = p.parse_args()
    runs = load_runs(args.json or sorted(DECODE.rglob("*.json")))
    if not args.all and not args.json:
        runs = best_per_config(runs)
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
