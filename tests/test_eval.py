"""``llmopt eval``: window plan, perplexity against a brute-force per-token computation,
agreement/KL, the JSON it writes, and one short run on the default model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmopt.eval import EvalConfig, evaluate, plan_windows
from llmopt.loading.loader import random_model
from llmopt.loading.presets import preset_config

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0) -> torch.nn.Module:
    return random_model(preset_config("tiny"), torch.device("cpu"), torch.float32, seed=seed)


@pytest.mark.parametrize("n,window,stride,bos", [(100, 32, 32, True), (100, 32, 10, True),
                                                 (100, 32, 10, False), (20, 64, 16, True), (33, 8, 3, False)])
def test_every_token_scored_once(n: int, window: int, stride: int, bos: bool) -> None:
    wins = plan_windows(n, window, stride, bos)
    scored = [t for w in wins for t in range(w.score_from, w.end)]
    assert scored == list(range(0 if bos else 1, n))
    for w in wins:
        assert w.end - w.begin <= window and w.begin <= w.score_from < w.end
        assert w.begin % stride == 0


@pytest.mark.parametrize("bos", [True, False])
def test_perplexity_matches_brute_force(bos: bool) -> None:
    model = tiny()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (57,), generator=g).tolist()
    cfg = EvalConfig(window=16, stride=6, max_tokens=None, bos=bos)
    res = evaluate(model, ids, cfg, bos_token_id=1)
    # brute force: each scored token from its own forward over exactly its window's prefix
    nll, count = 0.0, 0
    for w in plan_windows(len(ids), 16, 6, bos):
        for t in range(w.score_from, w.end):
            prefix = ([1] if bos else []) + ids[w.begin:t]
            logits = model(torch.tensor([prefix]))[0, -1].double()
            nll -= F.log_softmax(logits, -1)[ids[t]].item()
            count += 1
    assert res.tokens_scored == count
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert res.agreement is None and res.kl is None


def test_agreement_and_kl() -> None:
    ids = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    cfg = EvalConfig(window=16, stride=8, max_tokens=None)
    same = evaluate(tiny(), ids, cfg, 1, reference=tiny())
    assert same.agreement == 1.0 and abs(same.kl) < 1e-6
    other = evaluate(tiny(0), ids, cfg, 1, reference=tiny(5))
    assert other.agreement < 0.5 and other.kl > 0.01
    # KL against a brute-force float64 computation on one window
    a, b = tiny(0), tiny(5)
    x = torch.tensor([[1] + ids])
    one = evaluate(a, ids, EvalConfig(window=64, stride=64, max_tokens=None), 1, reference=b)
    lp = F.log_softmax(a(x)[0, :-1].double(), -1)
    lq = F.log_softmax(b(x)[0, :-1].double(), -1)
    kl = (lq.exp() * (lq - lp)).sum(-1).mean().item()
    assert one.kl == pytest.approx(kl, rel=1e-4)


def test_eval_cli_on_default_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   default_model_dir: str) -> None:
    """One short real run: int8 against the float model on the packaged corpus."""
    from llmopt.cli.main import main

    out = tmp_path / "r.json"
    rc = main(["eval", "--quant", "int8", "--reference", "smollm2-135m", "--device", "cpu",
               "--max-tokens", "160", "--window", "96", "--stride", "64", "--json", str(out)])
    so = capsys.readouterr().out
    assert rc == 0 and "perplexity" in so
    obj = json.loads(out.read_text())
    assert obj["command"].startswith("llmopt eval --model smollm2-135m --quant int8 --reference smollm2-135m")
    assert obj["quant"] == "int8" and obj["quant_config"]["method"] == "int8"  # resolved settings
    assert obj["quant_config"]["group_size"] == 0 and "lm_head" in obj["quant_config"]["skip"]
    r = obj["result"]
    assert r["tokens_scored"] == 160 and obj["config"]["bos_token_id"] == 1
    assert 5 < r["perplexity"] < 80  # a fluent English text for a real model
    assert r["agreement"] > 0.9 and 0 < r["kl"] < 0.05


def test_eval_reference_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str], default_model_dir: str) -> None:
    """bfloat16 against the float32 model: the reference really is loaded in float32 (KL > 0,
    where the same dtype gives exactly 0)."""
    from llmopt.cli.main import main

    kls = {}
    for ref_dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{ref_dtype}.json"
        rc = main(["eval", "--dtype", "bfloat16", "--reference", "smollm2-135m", "--reference-dtype", ref_dtype,
                   "--device", "cpu", "--max-tokens", "96", "--window", "96", "--stride", "96",
                   "--json", str(out)])
        capsys.readouterr()
        assert rc == 0
        obj = json.loads(out.read_text())
        assert obj["reference_dtype"] == ref_dtype and obj["dtype"] == "bfloat16"
        kls[ref_dtype] = obj["result"]["kl"]
    assert kls["bfloat16"] == 0.0 and 0 < kls["float32"] < 0.05


@pytest.mark.parametrize("args,msg", [
    (["--corpus", "MISSING"], "not found"),
    (["--corpus", "EMPTY"], "is empty"),
    (["--window", "64", "--stride", "100"], "--stride must be in 1..window"),
    (["--quant", "int4-g7"], "group size must be a power of two"),
])
def test_eval_bad_input(args: list[str], msg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmopt.cli.main import main

    (tmp_path / "empty.txt").write_text("")
    args = [str(tmp_path / "nope.txt") if a == "MISSING" else str(tmp_path / "empty.txt") if a == "EMPTY"
            else a for a in args]
    rc = main(["eval", "--model", "preset:tiny", "--device", "cpu", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and msg in err, err
