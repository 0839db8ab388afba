"""The device sampler against straightforward references."""

from __future__ import annotations

import pytest
import torch

from llmopt.errors import UserError
from llmopt.sampling import SamplingParams, SamplingTensors, sample
from llmopt.sampling.sampler import apply_repetition_penalty, filter_logits


def _st(**kw) -> SamplingTensors:
    return SamplingTensors.from_params([SamplingParams(**kw)], torch.device("cpu"))


def test_top_k_top_p_filter_matches_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 3
    out = filter_logits(logits, _st(temperature=0.7, top_k=10, top_p=0.8))[0]
    # Reference: temperature, keep the 10 best, then the smallest prefix reaching 0.8 of the mass.
    scaled = logits[0] / 0.7
    order = scaled.argsort(descending=True)[:10]
    probs = torch.softmax(scaled[order], -1)
    keep = []
    mass = 0.0
    for i, p in zip(order.tolist(), probs.tolist(), strict=True):
        if mass >= 0.8:
            break
        keep.append(i)
        mass += p
    assert set(torch.nonzero(torch.isfinite(out)).flatten().tolist()) == set(keep)
    assert torch.allclose(out[keep], scaled[keep])


def test_sampling_distribution_matches_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    st = _st(temperature=1.0)
    gen = torch.Generator().manual_seed(7)
    n = 20000
    counts = torch.zeros(5)
    draws = sample(logits.expand(n, 5).contiguous(), SamplingTensors.from_params(
        [SamplingParams(temperature=1.0)] * n, torch.device("cpu")), [gen])
    counts = torch.bincount(draws, minlength=5).float()
    expected = torch.softmax(logits[0], -1) * n
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 18.5  # 4 degrees of freedom, p = 0.001
    assert st.all_greedy is False


def test_greedy_rows_take_argmax() -> None:
    logits = torch.randn(3, 20)
    st = SamplingTensors.from_params(
        [SamplingParams(temperature=0), SamplingParams(temperature=0.5), SamplingParams(temperature=0)],
        torch.device("cpu"))
    out = sample(logits, st)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_repetition_penalty_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits = torch.randn(2, 30)
    seen_ids = torch.tensor([[1, 5, 7, 7], [0, 2, 29, 3]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter_(1, seen_ids, True)
    got = apply_repetition_penalty(logits, seen, torch.tensor([1.3, 1.3]))
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    assert torch.allclose(got, ref)


@pytest.mark.parametrize("kw, msg", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top-p"),
    ({"top_p": 1.5}, "top-p"),
    ({"top_k": -1}, "top-k"),
    ({"max_new_tokens": 0}, "max-new-tokens"),
])
def test_invalid_params(kw, msg) -> None:
    with pytest.raises(UserError, match=msg):
        SamplingParams(**kw)
