"""Distilling a draft (llmopt distill): the KL to the teacher falls, on-policy data is the
teacher's own greedy text, and the student works as an exact speculative draft."""

from __future__ import annotations

import pytest
import torch

from llmopt.engine.generate import Generator
from llmopt.errors import UserError
from llmopt.sampling import SamplingParams
from llmopt.speculative import SpeculativeConfig, SpeculativeGenerator, build_drafter
from llmopt.speculative.distill import DistillConfig, PolicySequences, distill, lr_lambda

CPU = torch.device("cpu")
TEXT = " ".join(
    f"Chapter {i}. The rain had not stopped since morning, and Mr. Knightley walked to Hartfield "
    f"with a letter number {i} in his pocket, thinking of what {['Emma', 'Harriet', 'Jane'][i % 3]} "
    f"would say when she read it by the fire." for i in range(120))


@pytest.fixture(scope="module")
def teacher(default_model_dir: str):
    from llmopt.loading.loader import load_model

    return load_model(default_model_dir, device="cpu", progress=False)


def test_policy_sequences_are_the_teachers_greedy_continuations(teacher) -> None:
    cfg = DistillConfig(num_layers=1, seq_len=16, on_policy=1.0, policy_prompt_len=12, policy_new_tokens=10)
    stream = torch.tensor(teacher.tokenizer.encode(TEXT, add_special_tokens=False))
    pol = PolicySequences.generate(teacher.model, stream, cfg, 3, CPU, seed=0)
    assert pol.seqs.shape == (3, 22)
    with torch.no_grad():
        logits = teacher.model(pol.seqs[:, :-1])  # full forward, no cache: [3, 21, V]
    assert torch.equal(logits[:, 11:].argmax(-1), pol.seqs[:, 12:])
    b = pol.batch(5)
    assert b.shape == (5, 17)
    assert all(any(torch.equal(row, s[o : o + 17]) for s in pol.seqs for o in range(6)) for row in b)


def test_distill_lowers_kl_and_the_student_drafts_exactly(teacher, tmp_path) -> None:
    cfg = DistillConfig(num_layers=2, steps=8, batch_size=2, seq_len=32, lr=2e-3, warmup_steps=1,
                        checkpoint_every=0, eval_batches=2, on_policy=0.5, policy_prompts=4,
                        policy_prompt_len=16, policy_new_tokens=24)
    out = tmp_path / "student"
    summary = distill(teacher.model, teacher.tokenizer, TEXT, cfg, out, CPU, progress=False)
    assert summary["held_out_after"]["kl"] < summary["held_out_before"]["kl"]
    assert summary["held_out_policy_after"]["kl"] < summary["held_out_policy_before"]["kl"]
    drafter = build_drafter(str(out), teacher.model, teacher.tokenizer, progress=False)
    prompt = teacher.tokenizer.encode("It is a truth universally acknowledged, that")
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    plain = Generator(teacher.model, teacher.tokenizer, CPU).generate([prompt], params)[0]
    gen = SpeculativeGenerator(teacher.model, teacher.tokenizer, CPU, drafter, SpeculativeConfig(k=3))
    assert gen.generate([prompt], params)[0].token_ids == plain.token_ids


def test_distill_config_rejects_bad_on_policy_settings() -> None:
    with pytest.raises(UserError, match="on-policy"):
        DistillConfig(num_layers=1, on_policy=1.5)
    with pytest.raises(UserError, match="seq-len"):
        DistillConfig(num_layers=1, seq_len=128, on_policy=0.5, policy_prompt_len=16, policy_new_tokens=16)


def test_unwrap_lines_joins_wrapped_lines_inside_paragraphs() -> None:
    from llmopt.speculative.distill import unwrap_lines

    text = "CHAPTER I\n\n\nIt is a truth\nuniversally   acknowledged,\nthat a man\n \n  Next\nline\n"
    assert unwrap_lines(text) == "CHAPTER I\n\nIt is a truth universally acknowledged, that a man\n\nNext line"


def test_time_limit_cuts_the_run_and_its_schedule(teacher, tmp_path) -> None:
    # A limit far below one step: the run stops as soon as its step time is known (23 steps).
    cfg = DistillConfig(num_layers=1, steps=60, batch_size=1, seq_len=16, lr=1e-3, warmup_steps=2,
                        checkpoint_every=0, eval_batches=1, time_limit_s=1e-3)
    summary = distill(teacher.model, teacher.tokenizer, TEXT, cfg, tmp_path / "s", CPU, progress=False)
    assert summary["steps_run"] == 23 and summary["loss_last"]["step"] == 23
    # The cosine schedule follows the shortened run: it reaches its floor at the new last step.
    total = [cfg.steps]
    f = lr_lambda(cfg, total)
    assert f(20) > 0.5
    total[0] = 21
    assert f(21) == pytest.approx(cfg.min_lr_ratio) and f(1) == 1.0
    with pytest.raises(UserError, match="time-limit"):
        DistillConfig(num_layers=1, time_limit_s=0)


def test_resume_and_policy_cache(teacher, tmp_path) -> None:
    """A second run reads the first's continuations from --policy-cache and starts from its
    student (--resume): its held-out numbers before training are the first run's after."""
    base = dict(num_layers=1, steps=3, batch_size=2, seq_len=16, lr=1e-3, warmup_steps=1,
                checkpoint_every=0, eval_batches=1, on_policy=0.5, policy_prompts=3,
                policy_prompt_len=8, policy_new_tokens=12)
    cache = tmp_path / "policy.pt"
    first = distill(teacher.model, teacher.tokenizer, TEXT,
                    DistillConfig(**base, policy_cache=str(cache)), tmp_path / "a", CPU, progress=False)
    assert cache.is_file() and not first["policy_from_cache"]
    second = distill(teacher.model, teacher.tokenizer, TEXT,
                     DistillConfig(**base, policy_cache=str(cache), resume=str(tmp_path / "a")),
                     tmp_path / "b", CPU, progress=False)
    assert second["policy_from_cache"]
    for k in ("kl", "top1_agreement"):
        assert second["held_out_before"][k] == pytest.approx(first["held_out_after"][k], rel=1e-4)
        assert second["held_out_policy_before"][k] == pytest.approx(first["held_out_policy_after"][k], rel=1e-4)
    with pytest.raises(UserError, match="other settings"):
        distill(teacher.model, teacher.tokenizer, TEXT,
                DistillConfig(**{**base, "policy_new_tokens": 10}, policy_cache=str(cache)),
                tmp_path / "c", CPU, progress=False)
    with pytest.raises(UserError, match="another shape"):
        distill(teacher.model, teacher.tokenizer, TEXT,
                DistillConfig(**{**base, "num_layers": 2}, resume=str(tmp_path / "a")),
                tmp_path / "d", CPU, progress=False)
