"""The repository's bench scripts that summarise committed results (no GPU, no matplotlib)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_decode_keeps_the_best_run_per_configuration(tmp_path: Path) -> None:
    plot = _module("plot_decode")

    def run(name: str, tps: float, roof: float, quant: str | None = None, prompt: int = 5,
            new: int = 200) -> Path:
        r = {"model": "preset:llama-2-7b", "quant": quant, "decode_tokens_per_s": tps,
             "roofline_tokens_per_s": roof, "config": {"batch_size": 1, "prompt_len": prompt, "new_tokens": new}}
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(r))
        return p

    paths = [run("a", 250.0, 300.0), run("b", 260.0, 320.0), run("ttft", 280.0, 300.0, prompt=1024, new=16),
             run("ctx", 220.0, 270.0, prompt=3896), run("int8", 330.0, 600.0, quant="int8"),
             tmp_path / "not_a_run.json"]
    paths[-1].write_text(json.dumps({"command": "x"}))
    best = plot.best_per_config(plot.load_runs(paths))
    by_label = {r["_label"]: r for r in best}
    assert sorted(by_label) == ["llama-2-7b bf16, b1 (best of 2)", "llama-2-7b bf16, b1, ctx 4k (best of 1)",
                                "llama-2-7b int8, b1 (best of 1)"]  # the TTFT run left out
    short = by_label["llama-2-7b bf16, b1 (best of 2)"]
    assert short["_file"] == "b.json" and short["_target"] == 0.9 * 320.0  # issue 3: 90% of its roofline
    assert by_label["llama-2-7b bf16, b1, ctx 4k (best of 1)"]["_target"] == 0.85 * 270.0
    assert by_label["llama-2-7b int8, b1 (best of 1)"]["_target"] == 340.0  # issue 4, tokens/s
