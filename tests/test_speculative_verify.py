"""Verification maths: greedy prefix acceptance and distribution-preserving rejection sampling."""

from __future__ import annotations

import torch

from llmopt.sampling import SamplingParams, SamplingTensors
from llmopt.sampling.verify import probs_from_logits, verify, verify_greedy, verify_sampling

# Chi-square critical values at significance 1e-4 (fixed, so the test is deterministic given the
# seed): degrees of freedom -> value. A wrong sampler (accept-always emits q) lands far above.
CHI2_CRIT_1E4 = {5: 25.74, 7: 29.88}


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson statistic of integer ``samples`` against ``probs`` [V] (all entries > 0)."""
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_verify_greedy_accepts_matching_prefix_then_target_token() -> None:
    vocab = 10
    target = torch.tensor([[3, 5, 7, 1], [2, 2, 2, 2]])  # [B, K+1] argmax rows
    logits = torch.nn.functional.one_hot(target, vocab).float()  # [B, K+1, V]
    drafts = torch.tensor([[3, 5, 8], [2, 2, 2]])
    res = verify_greedy(logits, drafts)
    assert res.num_accepted.tolist() == [2, 3]
    assert res.tokens[0, :3].tolist() == [3, 5, 7]  # two drafts, then the target's correction
    assert res.tokens[1].tolist() == [2, 2, 2, 2]  # all drafts, then the bonus token
    assert res.last_token().tolist() == [7, 2]
    assert res.packed().tolist()[0][:4] == [2, 3, 5, 7]
    # No drafts at all: the target's own argmax.
    res0 = verify_greedy(logits[:, :1], drafts[:, :0])
    assert res0.num_accepted.tolist() == [0, 0] and res0.tokens[:, 0].tolist() == [3, 2]


def _draws(p: torch.Tensor, q: torch.Tensor | None, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n independent verifications of K = q.shape[0] drafts (drawn from q, or fixed when q is None)."""
    gen = torch.Generator().manual_seed(seed)
    k = p.shape[0] - 1
    if q is None:
        drafts = torch.arange(k).expand(n, k).clone()  # deterministic drafter: tokens 0, 1, ...
        draft_probs = None
    else:
        drafts = torch.multinomial(q, n, replacement=True, generator=gen).T.contiguous()  # [n, K]
        draft_probs = q.expand(n, *q.shape)
    res = verify_sampling(p.expand(n, *p.shape), drafts, draft_probs, gen)
    return res.tokens, res.num_accepted


def test_rejection_sampling_preserves_target_distribution() -> None:
    torch.manual_seed(0)
    vocab, k, n = 6, 2, 60_000
    p = torch.softmax(torch.randn(k + 1, vocab) * 1.5, -1)  # [K+1, V] target per position
    q = torch.softmax(torch.randn(k, vocab) * 1.5, -1)  # [K, V] a different draft
    crit = CHI2_CRIT_1E4[vocab - 1]
    for draft_q in (q, None):
        tokens, accepted = _draws(p, draft_q, n, seed=1)
        # First emitted token ~ p_0 whatever happened to the drafts.
        assert chi_square(tokens[:, 0], p[0]) < crit
        # Second emitted token, when the first draft was accepted, ~ p_1.
        second = tokens[accepted >= 1, 1]
        assert second.numel() > 1000
        assert chi_square(second, p[1]) < crit
    # The test has power: accepting every draft emits q, which it must reject.
    drafts = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(2))
    assert chi_square(drafts[0], p[0]) > 10 * crit


def test_verify_applies_filters_to_target_and_draft_alike() -> None:
    torch.manual_seed(1)
    vocab, k, n = 8, 1, 60_000
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.95)
    st = SamplingTensors.from_params([params], torch.device("cpu"))
    t_logits = torch.randn(1, k + 1, vocab) * 2
    d_logits = torch.randn(1, k, vocab) * 2
    p = probs_from_logits(t_logits, st)[0]  # [K+1, V] the filtered target distribution
    q = probs_from_logits(d_logits, st)[0]
    assert (p == 0).sum() >= 2  # top-k/top-p really removed tokens
    gen = torch.Generator().manual_seed(3)
    drafts = torch.multinomial(q, n, replacement=True, generator=gen).T.contiguous()
    st_n = SamplingTensors.from_params([params] * n, torch.device("cpu"))
    res = verify(t_logits.expand(n, -1, -1), drafts, q.expand(n, -1, -1), st_n, gen)
    first = res.tokens[:, 0]
    assert p[0][first].min() > 0  # never a filtered-out token
    support = p[0] > 0
    remap = torch.cumsum(support.long(), 0) - 1
    assert chi_square(remap[first], p[0][support]) < CHI2_CRIT_1E4.get(int(support.sum()) - 1, 40.0)


def test_padding_is_never_accepted_and_bonus_comes_from_p() -> None:
    vocab = 10
    target = torch.tensor([[3, 5, 7, 1]])
    logits = torch.nn.functional.one_hot(target, vocab).float()
    res = verify_greedy(logits, torch.tensor([[3, 5, 7]]), num_drafts=1)  # padding that matches
    assert res.num_accepted.tolist() == [1] and res.last_token().tolist() == [5]
    # Sampling: one real draft padded to two; after accepting it, the next token is ~ p_1.
    torch.manual_seed(2)
    n = 60_000
    p = torch.softmax(torch.randn(3, 6) * 1.5, -1)
    q = torch.softmax(torch.randn(2, 6) * 1.5, -1)
    gen = torch.Generator().manual_seed(4)
    drafts = torch.multinomial(q, n, replacement=True, generator=gen).T.contiguous()
    res = verify_sampling(p.expand(n, -1, -1), drafts, q.expand(n, -1, -1), gen, num_drafts=1)
    assert int(res.num_accepted.max()) == 1
    assert chi_square(res.tokens[:, 0], p[0]) < CHI2_CRIT_1E4[5]
    second = res.tokens[res.num_accepted == 1, 1]
    assert chi_square(second, p[1]) < CHI2_CRIT_1E4[5]
