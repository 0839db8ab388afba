"""Speculative decoding: greedy equality for every drafter, cache rollback, adaptive k, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llmopt.engine.generate import Generator
from llmopt.loading.loader import random_model
from llmopt.loading.presets import preset_config
from llmopt.sampling import SamplingParams, SamplingTensors
from llmopt.speculative import (
    AlwaysWrongDrafter,
    ModelDrafter,
    NgramDrafter,
    ReplayDrafter,
    SpeculativeConfig,
    SpeculativeGenerator,
    SpeculativeStats,
    build_drafter,
    parse_draft_spec,
)
from llmopt.speculative.adaptive import AdaptiveK, AdaptiveKConfig, StepCosts
from llmopt.speculative.drafters import model_cost

CPU = torch.device("cpu")
GREEDY = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)


def _quant_available() -> bool:
    try:
        from llmopt.quant import api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return random_model(preset_config("tiny").replace(num_layers=3), CPU, torch.float32, seed=0)


def _drafters(model: torch.nn.Module, reference: list[int], names: list[str]) -> list:
    out = []
    for name in names:
        if name == "replay":
            out.append(ReplayDrafter(reference))
        elif name == "always-wrong":
            out.append(AlwaysWrongDrafter(reference, model.config.vocab_size))
        elif name == "draft-model":
            other = random_model(model.config.replace(num_layers=1), CPU, torch.float32, seed=7)
            out.append(ModelDrafter(other, "draft-model", model_cost(other, model)))
        elif name.startswith("self-int") and not _quant_available():
            continue
        else:
            out.append(build_drafter(name, model, None))
    return out


TINY_DRAFTERS = ["ngram", "self-layers:1", "self-layers:2", "replay", "always-wrong", "draft-model",
                 "self-int4"]


@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_equal_for_every_drafter_tiny(tiny: torch.nn.Module, adaptive: bool) -> None:
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    ref = Generator(tiny, None, CPU).generate([prompt], GREEDY)[0].token_ids
    # Adaptive k mostly changes how many drafts are verified: a few drafters cover it.
    names = TINY_DRAFTERS if not adaptive else ["ngram", "self-layers:2", "replay", "always-wrong"]
    for drafter in _drafters(tiny, ref, names):
        gen = SpeculativeGenerator(tiny, None, CPU, drafter, SpeculativeConfig(k=3, adaptive=adaptive))
        out = gen.generate([prompt], GREEDY)[0]
        assert out.token_ids == ref, drafter.name
        stats = out.extra["speculative"]
        assert isinstance(stats, dict)
        if drafter.name == "replay":
            assert stats["acceptance_rate"] == 1.0 and stats["mean_tokens_per_step"] > 3
        if drafter.name == "always-wrong":
            assert stats["accepted_tokens"] == 0 and stats["drafted_tokens"] > 0
        if not adaptive and drafter.name.startswith("self-layers"):
            assert stats["draft_steps"] >= stats["steps"] - 2  # really drafted each step


def test_greedy_equal_default_model(default_model_dir: str) -> None:
    from llmopt.loading.loader import load_model

    lm = load_model(default_model_dir, device="cpu", progress=False)
    text = ("It is a truth universally acknowledged, that a single man in possession of a good "
            "fortune, must be in want of a wife. It is a truth universally")
    prompt = lm.tokenizer.encode(text)
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    ref = Generator(lm.model, lm.tokenizer, CPU).generate([prompt], params)[0]
    drafters = _drafters(lm.model, ref.token_ids,
                         ["ngram", "self-layers:10", "replay", "always-wrong", "self-int8"])
    for drafter in drafters:
        gen = SpeculativeGenerator(lm.model, lm.tokenizer, CPU, drafter,
                                   SpeculativeConfig(k=4, adaptive=False))
        out = gen.generate([prompt], params)[0]
        assert out.token_ids == ref.token_ids, drafter.name
        assert out.text == ref.text
    # The prompt repeats itself: n-gram lookup must have found and kept drafts.
    gen = SpeculativeGenerator(lm.model, lm.tokenizer, CPU, NgramDrafter(), SpeculativeConfig(k=4))
    stats = gen.generate([prompt], params)[0].extra["speculative"]
    assert isinstance(stats, dict) and stats["accepted_tokens"] > 0


def test_plain_runs_stop_where_plain_decoding_stops(default_model_dir: str) -> None:
    """Drafts that always fail send adaptive k to runs of plain steps, whose host reads each token
    a step late: the output still ends exactly where plain decoding's does, at end-of-sequence
    and at a stop string, with the same text and finish reason."""
    from llmopt.loading.loader import load_model

    lm = load_model(default_model_dir, device="cpu", progress=False)
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    prompt = lm.tokenizer.encode(text)
    for params in (SamplingParams(max_new_tokens=40, temperature=0),
                   SamplingParams(max_new_tokens=40, temperature=0, stop=(" Paris",))):
        ref = Generator(lm.model, lm.tokenizer, CPU).generate([prompt], params)[0]
        assert ref.finish_reason == "stop" and len(ref.token_ids) < 40
        gen = SpeculativeGenerator(lm.model, lm.tokenizer, CPU, AlwaysWrongDrafter(ref.token_ids, 49152),
                                   SpeculativeConfig(k=4))
        out = gen.generate([prompt], params)[0]
        assert (out.token_ids, out.text, out.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
        stats = out.extra["speculative"]
        assert isinstance(stats, dict) and stats["k_histogram"].get("0", 0) >= len(ref.token_ids) // 2


def test_fixed_width_verify_padding_keeps_greedy_equal(tiny: torch.nn.Module) -> None:
    # The padding used by compiled verification, exercised eagerly: the uncompiled static step
    # stands in for the graph (it reads the whole cache, as the graph does).
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    ref = Generator(tiny, None, CPU).generate([prompt], GREEDY)[0].token_ids
    for drafter in _drafters(tiny, ref, ["ngram", "self-layers:2"]) + [ReplayDrafter(ref[:20])]:
        gen = SpeculativeGenerator(tiny, None, CPU, drafter, SpeculativeConfig(k=3))
        gen._verify_graph = gen._verify_static
        out = gen.generate([prompt], GREEDY)[0]
        assert out.token_ids == ref, drafter.name


def test_target_cache_rollback_matches_fresh_recompute(tiny: torch.nn.Module) -> None:
    model = copy.deepcopy(tiny)
    fresh = copy.deepcopy(tiny)
    model.setup_caches(1, 64)
    prompt = torch.tensor([[3, 4, 5, 6, 7]])
    model(prompt, torch.arange(5)[None], kv_len=5)
    # Verify 4 tokens at positions 5..8, then reject all but the first: roll back to position 6.
    model(torch.tensor([[11, 12, 13, 14]]), torch.arange(5, 9)[None], kv_len=9)
    got = model(torch.tensor([[21, 22]]), torch.arange(6, 8)[None], kv_len=8)  # [1, 2, V]
    want = fresh(torch.tensor([[3, 4, 5, 6, 7, 11, 21, 22]]))[:, -2:]  # no cache at all
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_draft_cache_rollback_and_bonus_token(tiny: torch.nn.Module) -> None:
    draft_model = random_model(tiny.config.replace(num_layers=2), CPU, torch.float32, seed=3)
    fresh = copy.deepcopy(draft_model)
    drafter = ModelDrafter(draft_model, "d", 0.5)
    st = SamplingTensors.from_params([GREEDY], CPU)
    prompt = [3, 4, 5, 6]
    drafter.start(prompt, 64, st, None)

    def greedy_continuation(ids: list[int], k: int) -> list[int]:
        params = SamplingParams(max_new_tokens=k, temperature=0, ignore_eos=True)
        return Generator(fresh, None, CPU).generate([ids], params)[0].token_ids

    ids = [*prompt, 9]
    first = drafter.propose(ids, 3).tokens[0].tolist()
    assert first == greedy_continuation(ids, 3)
    # One draft accepted, then a bonus token the draft never proposed.
    drafter.accept(1)
    ids = [*ids, first[0], (first[1] + 1) % 512]
    second = drafter.propose(ids, 3).tokens[0].tolist()
    assert second == greedy_continuation(ids, 3)
    # Every draft accepted (the last one was never fed to the draft), then a bonus token.
    drafter.accept(3)
    ids = [*ids, *second, 42]
    # A step without drafting leaves a backlog of two tokens plus this step's.
    assert drafter.propose(ids, 0).num_tokens == 0
    drafter.accept(0)
    ids = [*ids, 43]
    assert drafter.propose(ids, 2).tokens[0].tolist() == greedy_continuation(ids, 2)


def test_self_drafts_share_the_targets_caches_and_never_catch_up() -> None:
    """self-layers:N reads the target's caches of its layers: after steps the target ran alone
    (a backlog for a draft with its own cache) it feeds only the pending token, and still drafts
    what the truncated model with a cache of its own, fed everything, drafts."""
    from llmopt.speculative.drafters import SelfDrafter, truncated_model

    target = random_model(preset_config("tiny").replace(num_layers=3), CPU, torch.float32, seed=4)
    fresh = copy.deepcopy(truncated_model(target, 2))
    drafter = build_drafter("self-layers:2", target, None)
    assert isinstance(drafter, SelfDrafter)
    fed: list[int] = []
    feed = drafter._feed
    drafter._feed = lambda tokens, with_logits=True: fed.append(len(tokens)) or feed(tokens, with_logits)  # type: ignore[method-assign]

    def greedy_continuation(ids: list[int], k: int) -> list[int]:
        fresh.clear_caches()
        params = SamplingParams(max_new_tokens=k, temperature=0, ignore_eos=True)
        return Generator(fresh, None, CPU).generate([ids], params)[0].token_ids

    def target_writes(ids: list[int], start: int) -> None:  # the target's own forward of ids[start:]
        target(torch.tensor([ids[start:]]), torch.arange(start, len(ids))[None], kv_len=len(ids))

    prompt = [3, 4, 5, 6, 7]
    target.setup_caches(1, 64)
    target_writes(prompt, 0)  # prefill
    drafter.start(prompt, 64, SamplingTensors.from_params([GREEDY], CPU), None)
    layer = drafter.model.model.layers[1].self_attn
    assert layer.kv_cache is target.model.layers[1].self_attn.kv_cache
    ids = [*prompt, 9]
    assert drafter.propose(ids, 3).tokens[0].tolist() == greedy_continuation(ids, 3)
    drafter.accept(0)
    # The target verifies position 5 (overwriting the draft's entries), then decodes three plain
    # steps on its own: a draft with its own cache would now feed five tokens.
    ids = [*ids, 17, 18, 19, 20]
    target_writes(ids[:-1], len(prompt))
    fed.clear()
    assert drafter.propose(ids, 3).tokens[0].tolist() == greedy_continuation(ids, 3)
    assert fed == [1]
    # A quantised self-draft reads the target's caches too (its own rounding would only move the
    # keys away from what the target attends to), and also feeds just the pending token.
    quant = build_drafter("self-int8", target, None)
    assert isinstance(quant, SelfDrafter)
    quant.start(prompt, 64, SamplingTensors.from_params([GREEDY], CPU), None)
    assert all(m.self_attn.kv_cache is t.self_attn.kv_cache
               for m, t in zip(quant.model.model.layers, target.model.layers, strict=True))
    qfed: list[int] = []
    qfeed = quant._feed
    quant._feed = lambda tokens, with_logits=True: qfed.append(len(tokens)) or qfeed(tokens, with_logits)  # type: ignore[method-assign]
    assert quant.propose(ids, 3).num_tokens == 3 and qfed == [1]
    target.clear_caches()


def test_speculative_sampling_is_seeded_and_valid(tiny: torch.nn.Module) -> None:
    params = SamplingParams(max_new_tokens=30, temperature=0.9, top_k=50, seed=5, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    draft = build_drafter("self-layers:2", tiny, None)
    gen = SpeculativeGenerator(tiny, None, CPU, draft, SpeculativeConfig(k=3, adaptive=False))
    a = gen.generate([prompt], params)[0]
    b = gen.generate([prompt], params)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 30
    stats = a.extra["speculative"]
    assert isinstance(stats, dict) and stats["drafted_tokens"] > 0


def test_ngram_drafter_proposes_latest_match() -> None:
    d = NgramDrafter(max_ngram=3, min_ngram=1)
    d.start([], 64, SamplingTensors.from_params([GREEDY], CPU), None)
    ids = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 1, 2, 3]
    # "1 2 3" occurs twice before the end; the latest is followed by 5 6 7.
    assert d.propose(ids, 3).tokens[0].tolist() == [5, 6, 7]
    assert d.propose([*ids, 8], 3).num_tokens == 0  # "3 8" / "8" never seen before
    assert d.propose([*ids, 8, 2, 3], 2).tokens[0].tolist() == [8, 2]  # latest "2 3" wins


def test_stats_separate_full_k_steps() -> None:
    s = SpeculativeStats("d", 4, False)
    for drafted, accepted in [(4, 4), (4, 2), (1, 0), (0, 0)]:  # the last two: the budget cut k short
        s.record(drafted, accepted)
    assert s.mean_accepted_per_step == 2.0  # 6 accepted over 3 steps that drafted
    assert s.mean_accepted_per_full_step == 3.0  # 6 over the 2 steps that drafted all 4
    assert s.acceptance_by_position == [2 / 3, 1.0, 0.5, 0.5]
    assert s.mean_tokens_per_step == 10 / 4
    assert SpeculativeStats("d", 4, False).mean_accepted_per_full_step is None


def test_adaptive_k_follows_acceptance() -> None:
    ctl = AdaptiveK(AdaptiveKConfig(k_max=4, verify_cost=0.03, probe_every=5, probe_max=20), draft_cost=0.0)
    for _ in range(20):
        ctl.update(4, 4)
    assert ctl.next_k() == 4
    ks = []
    for _ in range(150):  # every draft rejected from now on
        ks.append(ctl.next_k())
        ctl.update(ks[-1], 0)
    assert ks[0] > 0 and ks[-100:].count(0) >= 90  # plain decoding, with an occasional probe
    probes = [i for i, k in enumerate(ks) if k == 1 and ks[i - 1] == 0]
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps[:3] == [10, 20, 20] and set(gaps) == {10, 20}  # a probe every 5, 10, 20, 20... steps
    # A probe the drafter had nothing for (n-gram lookup without a match) costs no compute: the
    # drafter is asked again after free_probe_gap (3) plain steps, not after the probe interval.
    assert ctl.next_k() == 0
    while (k := ctl.next_k()) == 0:
        pass
    assert k == 1
    for _ in range(2):
        ctl.update(0, 0)
        assert [ctl.next_k() for _ in range(4)] == [0, 0, 0, 1]
    ctl.update(1, 0)  # a real probe, rejected: back to the (doubled) interval
    assert [ctl.next_k() for _ in range(20)] == [0] * 19 + [1]
    fixed = AdaptiveK(AdaptiveKConfig(k_max=3, adaptive=False), draft_cost=0.0)
    fixed.update(3, 0)
    assert fixed.next_k() == 3


def _drive(ctl: AdaptiveK, costs: StepCosts, seconds: dict[int, float], accept: float,
           steps: int) -> list[int]:
    """Run the controller against a simulated drafter: each drafted token accepted with
    probability ``accept`` (a prefix), a step drafting k tokens taking ``seconds[k]``."""
    gen = torch.Generator().manual_seed(0)
    ks = []
    for _ in range(steps):
        k = ctl.next_k()
        ks.append(k)
        n = 0
        while n < k and torch.rand((), generator=gen).item() < accept:
            n += 1
        ctl.update(k, n)
        costs.observe(k, seconds[k])
    return ks


def test_adaptive_k_follows_measured_step_costs() -> None:
    cfg = AdaptiveKConfig(k_max=4, verify_cost=0.03, probe_every=8)
    # A launch-bound small target: verifying costs 1.6 plain steps and a draft token half a step,
    # though the byte-count model (draft_cost 0.1) says drafting is cheap. At 75% acceptance
    # drafting does not pay (best ratio 1.75 / 2.1 at k = 1): plain decoding, with k = 1 probes.
    slow = {k: 1.0 if k == 0 else 1.6 + 0.5 * k for k in range(5)}
    costs = StepCosts(4)
    ctl = AdaptiveK(cfg, draft_cost=0.1, costs=costs)
    ks = _drive(ctl, costs, slow, 0.75, 200)
    assert ks[1] == 0  # the early plain step that drafting is measured against
    assert ks[-100:].count(0) >= 80 and sum(k > 1 for k in ks[-100:]) <= 5
    assert AdaptiveK(cfg, draft_cost=0.1).best_k() >= 3  # the model alone would draft
    # Bandwidth-bound: verification nearly free, drafts cheap: the full k, with a few probes.
    fast = {k: 1.0 + 0.05 * k for k in range(5)}
    costs = StepCosts(4)
    ctl = AdaptiveK(cfg, draft_cost=0.1, costs=costs)
    ks = _drive(ctl, costs, fast, 0.75, 200)
    assert ks[-100:].count(4) >= 80
    assert abs(costs.relative(4) - 1.2) < 1e-9


def test_step_costs_shrug_off_one_slow_step() -> None:
    costs = StepCosts(2)
    costs.observe(1, 5.0)  # a graph capture
    costs.observe(1, 0.01)  # the real cost: replaces the capture's at once
    assert costs.seconds[1] == 0.01
    costs.observe(1, 1.0)  # the host preempted once: bounded to 3x, then averaged
    assert costs.seconds[1] == pytest.approx(0.8 * 0.01 + 0.2 * 0.03)
    assert costs.relative(1) is None  # no plain step measured yet
    costs.observe(0, 0.01)
    assert costs.relative(1) == pytest.approx(1.4)
    assert costs.stalest([0, 1, 2]) == 2  # never seen


def test_measured_costs_only_where_tokens_stay_reproducible(tiny: torch.nn.Module) -> None:
    prompt = [5, 6, 7, 8]
    gen = SpeculativeGenerator(tiny, None, CPU, build_drafter("self-layers:2", tiny, None),
                               SpeculativeConfig(k=3))
    stats = gen.generate([prompt], GREEDY)[0].extra["speculative"]
    assert isinstance(stats, dict) and stats["step_costs"] == "measured"
    timed = set(stats["step_ms_by_drafted"])
    assert "0" in timed and timed - {"0"}  # plain steps and drafting ones were timed
    # Seeded sampling: k follows the cost model only, so the same seed gives the same tokens.
    params = SamplingParams(max_new_tokens=30, temperature=0.9, seed=3, ignore_eos=True)
    a, b = (gen.generate([prompt], params)[0] for _ in range(2))
    assert a.token_ids == b.token_ids
    assert a.extra["speculative"]["step_costs"] == "modelled"


def test_draft_spec_parsing_and_errors() -> None:
    from llmopt.errors import UserError

    assert parse_draft_spec("self-layers:8").num_layers == 8
    assert parse_draft_spec("ngram:3").max_ngram == 3
    assert parse_draft_spec("some/dir").kind == "model"
    for bad in ("self-layers", "self-layers:x", "self-int3", "ngram:1", ""):
        with pytest.raises(UserError):
            parse_draft_spec(bad)
    with pytest.raises(UserError, match="batch size 1"):
        gen = SpeculativeGenerator(random_model(preset_config("tiny"), CPU, torch.float32), None,
                                   CPU, NgramDrafter())
        gen.generate([[1, 2], [3, 4]], GREEDY)


def test_cli_refuses_draft_with_other_vocabulary(default_model_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    from llmopt.cli.main import main

    rc = main(["generate", "--model", default_model_dir, "--device", "cpu", "--prompt", "Hello",
               "--max-new-tokens", "2", "--draft", "preset:tiny"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "vocabulary" in err and len(err.strip().splitlines()) == 1


def test_cli_generate_with_ngram_draft_reports_stats(
    default_model_dir: str, capsys: pytest.CaptureFixture[str], tmp_path, monkeypatch
) -> None:
    """--draft ngram reports its stats; with --compile (regional: compiled verify steps) the text
    is the uncompiled run's."""
    from llmopt.cli.main import main

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path))
    cmd = ["generate", "--model", default_model_dir, "--device", "cpu", "--prompt",
           "one two three four, one two three four, one two", "--temperature", "0",
           "--max-new-tokens", "8", "--draft", "ngram", "--json"]
    assert main(cmd) == 0
    obj = json.loads(capsys.readouterr().out)
    spec = obj["speculative"]
    assert spec["drafter"] == "ngram" and spec["k_max"] == 4
    assert len(spec["acceptance_by_position"]) == 4
    assert main(cmd + ["--compile", "--compile-mode", "regional"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert compiled["text"] == obj["text"] and compiled["speculative"]["drafted_tokens"] > 0


def test_regional_compiled_speculation_keeps_greedy_equal(tmp_path, monkeypatch) -> None:
    """--compile-mode regional with speculation: the verify step and the draft's one-token step
    run compiled layers (one compiled graph per step width, shared by every layer) and still emit
    plain greedy decoding's tokens; the draft's feeds of up to FEED_BY_STEP tokens go through
    that compiled step token by token, longer ones (the prompt) stay eager."""
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path))
    model = random_model(preset_config("tiny").replace(num_layers=3), CPU, torch.float32, seed=0)
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    ref = Generator(model, None, CPU).generate([prompt], GREEDY)[0].token_ids
    for drafter in _drafters(model, ref, ["self-layers:2"]) + [ReplayDrafter(ref[:20])]:
        cfg = SpeculativeConfig(k=3, adaptive=False, compile=True, compile_mode="regional", max_seq_len=128)
        out = SpeculativeGenerator(model, None, CPU, drafter, cfg).generate([prompt], GREEDY)[0]
        assert out.token_ids == ref, drafter.name
        assert model.model.layers[0]._compiled_call_impl is None


def test_warm_up_compiles_what_the_compared_run_uses(tmp_path, monkeypatch) -> None:
    """``warm_up`` on 3 tokens fixes the cache at the full run's size (over one CACHE_ROUND here)
    and compiles the plain generator that ``compare_plain`` times: the measured runs then compile
    nothing, the plain one is the compiled generator, and both emit the same greedy tokens."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path))
    model = random_model(preset_config("tiny").replace(num_layers=2), CPU, torch.float32, seed=0)
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
    params = SamplingParams(max_new_tokens=300, temperature=0, ignore_eos=True)
    cfg = SpeculativeConfig(k=3, compile=True, compile_mode="regional", compare_plain=True)
    gen = SpeculativeGenerator(model, None, CPU, NgramDrafter(), cfg)
    gen.warm_up([prompt], params.max_new_tokens)
    seq_len, frames = model.max_seq_len, counters["stats"]["unique_graphs"]
    assert seq_len >= len(prompt) + 300 + 4 and gen.plain_generator().compiled
    out = gen.generate([prompt], params)[0]
    assert counters["stats"]["unique_graphs"] == frames  # no compile inside the timed runs
    assert model.max_seq_len == seq_len
    assert out.extra["speculative"]["same_tokens_as_plain"] is True
    assert out.extra["speculative"]["plain_decode_tokens_per_s"] > 0


def test_cli_bench_draft_on_copied_text(default_model_dir: str, tmp_path, monkeypatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``bench --draft ngram --prompt-file``: a prompt whose answer copies a passage it holds is
    drafted from that passage (several tokens per target step), greedy tokens equal plain
    decoding's in every run, and the JSON holds both speeds and the speedup."""
    from importlib.resources import files

    from llmopt.cli.main import main

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))
    lines = (files("llmopt.data") / "prideprejudice.txt").read_text(encoding="utf-8").splitlines()
    passage = "\n".join(lines[9:24])
    prompt = tmp_path / "copy.txt"
    prompt.write_text(f"{passage}\n\n---\n\n{lines[9]}", encoding="utf-8")
    out = tmp_path / "spec.json"
    assert main(["bench", "--model", default_model_dir, "--device", "cpu", "--draft", "ngram",
                 "--prompt-file", str(prompt), "--new-tokens", "24", "--runs", "3", "--warmup", "0",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "ms per step by drafts" in printed
    r = json.loads(out.read_text())
    assert r["same_tokens_as_plain"] is True and len(r["runs"]) == 3
    assert r["speculative"]["step_costs"] == "measured" and "0" in r["speculative"]["step_ms_by_drafted"]
    assert r["speculative"]["mean_tokens_per_step"] > 1.5
    assert r["speedup"] == pytest.approx(r["speculative_decode_tokens_per_s"] / r["plain_decode_tokens_per_s"])
