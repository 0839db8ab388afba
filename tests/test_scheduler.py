"""Scheduler with fake model outputs (no model): admission, chunked prefill, preemption, finishing."""

from __future__ import annotations

import random

from llmopt.engine.request import Request
from llmopt.engine.scheduler import ModelRunnerOutput, Scheduler, SchedulerConfig, SchedulerOutput
from llmopt.sampling.params import SamplingParams


def _req(rid: str, n: int, max_new: int = 4, base: int = 0, **kw: object) -> Request:
    params = SamplingParams(max_new_tokens=max_new, temperature=0, **kw)  # type: ignore[arg-type]
    return Request(rid, [base + i for i in range(n)], params, eos_token_ids=frozenset({2}))


def _fake_run(out: SchedulerOutput, token: int = 7) -> ModelRunnerOutput:
    """A model that samples ``token`` for every sequence that reached its last known token."""
    seqs = [s for s in out.seqs if s.sample]
    return ModelRunnerOutput([s.req_id for s in seqs], [token] * len(seqs))


def _sched(**kw: int) -> Scheduler:
    cfg = {"num_blocks": 32, "block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 64}
    cfg.update(kw)
    return Scheduler(SchedulerConfig(**cfg))  # type: ignore[arg-type]


def test_admission_limited_by_token_budget_with_chunked_prefill() -> None:
    s = _sched(max_num_batched_tokens=16)
    s.add_request(_req("a", 10))
    s.add_request(_req("b", 10, base=100))
    out = s.schedule()
    assert [(q.req_id, len(q.token_ids), q.start_pos, q.sample) for q in out.seqs] == [
        ("a", 10, 0, True), ("b", 6, 0, False)]  # b's prompt is split: a chunk now, the rest next
    assert out.num_scheduled_tokens == 16
    s.update_from_output(out, _fake_run(out))
    out = s.schedule()
    # a decodes one token while b's prefill continues in the same step
    assert [(q.req_id, len(q.token_ids), q.start_pos, q.sample) for q in out.seqs] == [
        ("a", 1, 10, True), ("b", 4, 6, True)]
    assert out.seqs[0].token_ids == [7]


def test_admission_limited_by_blocks_and_max_num_seqs() -> None:
    s = _sched(num_blocks=6, max_num_batched_tokens=1000)
    s.add_request(_req("a", 12))  # 3 blocks + room to grow
    s.add_request(_req("b", 12, base=50))
    s.add_request(_req("c", 2, base=90))
    out = s.schedule()
    assert [q.req_id for q in out.seqs] == ["a", "b"]  # c is FCFS-blocked (no skipping ahead)
    assert s.num_waiting == 1
    s2 = _sched(max_num_seqs=2)
    for i in range(3):
        s2.add_request(_req(f"r{i}", 3, base=10 * i))
    assert len(s2.schedule().seqs) == 2


def test_preemption_by_recompute_and_resume_loses_nothing() -> None:
    s = _sched(num_blocks=4, block_size=4, max_num_batched_tokens=100)
    a, b = _req("a", 4, max_new=6), _req("b", 4, max_new=6, base=50)
    s.add_request(a)
    s.add_request(b)
    tokens = iter(range(300, 400))
    preempted = False
    for _ in range(40):
        out = s.schedule()
        if out.preempted_req_ids:
            preempted = True
            assert out.preempted_req_ids == ["b"]  # the latest admitted goes first
            assert b.num_computed_tokens == 0 and s.block_manager.block_table("b") == []
        if out.is_empty and not s.has_unfinished():
            break
        res = ModelRunnerOutput([q.req_id for q in out.seqs if q.sample],
                                [next(tokens) for q in out.seqs if q.sample])
        s.update_from_output(out, res)
        s.block_manager.check_invariants()
    assert preempted and a.finished and b.finished
    assert len(a.output_token_ids) == 6 and len(b.output_token_ids) == 6
    # The resumed request kept every token it had before preemption.
    assert b.all_token_ids == b.prompt_token_ids + b.output_token_ids
    assert s.block_manager.num_free_blocks == 4
    s.block_manager.check_invariants()


def test_resume_after_preemption_hits_its_own_cached_blocks() -> None:
    s = _sched(num_blocks=5, block_size=4, max_num_batched_tokens=100)
    a, b = _req("a", 8, max_new=8), _req("b", 8, max_new=8, base=50)
    s.add_request(a)
    s.add_request(b)
    while s.has_unfinished():
        out = s.schedule()
        s.update_from_output(out, _fake_run(out, 9))
    assert b.num_preemptions >= 1
    assert s.block_manager.stats.hit_tokens > 0  # recompute reused b's still-cached blocks


def test_prefix_hit_in_same_step_and_later() -> None:
    s = _sched()
    s.add_request(_req("a", 9))
    s.add_request(_req("b", 9))  # same prompt
    out = s.schedule()
    # a's full blocks are published at scheduling time, so b hits them in the same step
    assert [(q.req_id, q.start_pos, len(q.token_ids)) for q in out.seqs] == [("a", 0, 9), ("b", 8, 1)]
    assert out.seqs[1].block_ids[:2] == out.seqs[0].block_ids[:2]
    assert s.requests["b"].num_cached_tokens == 8


def test_finish_on_eos_stop_and_length() -> None:
    s = _sched()
    eos_req, len_req = _req("eos", 3, max_new=10), _req("len", 3, max_new=2, base=40)
    s.add_request(eos_req)
    s.add_request(len_req)
    out = s.schedule()
    ups = s.update_from_output(out, ModelRunnerOutput(["eos", "len"], [2, 5]))
    assert eos_req.finished and eos_req.finish_reason == "stop" and eos_req.output_token_ids == []
    assert ups[0].finished and ups[0].new_token_ids == []  # EOS is not an output token
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput(["len"], [5]))
    assert len_req.finished and len_req.finish_reason == "length" and len_req.output_token_ids == [5, 5]
    ign = _req("ign", 3, max_new=2, base=60, ignore_eos=True)
    s.add_request(ign)
    out = s.schedule()
    s.update_from_output(out, _fake_run(out, 2))
    assert not ign.finished and ign.output_token_ids == [2]
    assert s.block_manager.num_used_blocks == 1


class _FakeDetok:
    """Each token id becomes one character."""

    def __init__(self) -> None:
        self.text = ""

    def add(self, t: int) -> str:
        self.text += chr(ord("a") + t % 26)
        return self.text[-1]

    def flush(self) -> str:
        return ""


def test_stop_string_cuts_text_and_finishes() -> None:
    s = _sched()
    r = Request("s", [1, 2, 3], SamplingParams(max_new_tokens=20, temperature=0, stop=("cd",)),
                detok=_FakeDetok())
    s.add_request(r)
    deltas = []
    for t in [0, 1, 2, 3, 4]:  # a b c d e
        out = s.schedule()
        s.update_from_output(out, ModelRunnerOutput(["s"], [t]))
        deltas.append(r.take_text_delta())
        if r.finished:
            break
    assert r.finished and r.finish_reason == "stop"
    assert "".join(deltas) == "ab" and r.text == "ab"  # "c" was held back, then cut


def test_abort_frees_blocks() -> None:
    s = _sched()
    s.add_request(_req("a", 10))
    s.add_request(_req("w", 10, base=30))
    s.schedule()
    s.abort_requests(["a", "w", "missing"])
    assert not s.has_unfinished() and s.block_manager.num_free_blocks == 32
    assert set(s.schedule().finished_req_ids) == {"a", "w"}


def test_no_leaked_block_after_1000_random_requests() -> None:
    rng = random.Random(1)
    s = _sched(num_blocks=48, block_size=4, max_num_seqs=16, max_num_batched_tokens=40)
    prefixes = [[rng.randrange(3, 200) for _ in range(rng.randrange(0, 14))] for _ in range(4)]
    added = finished = 0
    steps = 0
    while finished < 1000:
        while added < 1000 and rng.random() < 0.6:
            toks = rng.choice(prefixes) + [rng.randrange(3, 200) for _ in range(rng.randrange(1, 20))]
            r = Request(f"r{added}", toks, SamplingParams(max_new_tokens=rng.randrange(1, 12),
                                                          temperature=0), eos_token_ids=frozenset({2}))
            s.add_request(r)
            added += 1
        if rng.random() < 0.03 and s.running:
            finished += len(s.abort_requests([rng.choice(s.running).request_id]))
        out = s.schedule()
        assert out.num_scheduled_tokens <= 40 and len(out.seqs) <= 16
        res = ModelRunnerOutput([q.req_id for q in out.seqs if q.sample],
                                [rng.choice([2] + list(range(3, 200))) for q in out.seqs if q.sample])
        finished += sum(u.finished for u in s.update_from_output(out, res))
        s.block_manager.check_invariants()
        steps += 1
        assert steps < 20000, "scheduler stopped making progress"
    assert not s.has_unfinished() and s.requests == {}
    assert s.block_manager.num_free_blocks == 48 and all(c == 0 for c in s.block_manager.ref_counts)
    assert s.num_preemptions > 0 and s.block_manager.stats.hit_tokens > 0
