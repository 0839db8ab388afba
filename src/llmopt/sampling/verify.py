"""Verification of drafted tokens for speculative decoding, on the device and without host syncs.

Greedy: the accepted drafts are the longest prefix equal to the target's argmax, followed by the
target's own argmax at the first mismatch (or after the last draft: the bonus token). The output is
therefore exactly what plain greedy decoding would produce.

Sampling: rejection sampling (Leviathan et al. 2023; Chen et al. 2023). Draft token ``d_i`` drawn
from ``q_i`` is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection the
replacement is drawn from ``normalise(max(p_i - q_i, 0))``; when every draft is accepted the bonus
token is drawn from ``p_k``. Every emitted token is then distributed exactly as under ``p``.
``p`` and ``q`` must be built by the same ``filter_logits`` settings (``probs_from_logits``).

Shapes: ``B`` rows, ``K`` drafted tokens per row (``K`` may be 0), vocabulary ``V``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from llmopt.sampling.sampler import SamplingTensors, filter_logits


@dataclass
class VerifyResult:
    tokens: torch.Tensor  # [B, K+1] int64; the first num_accepted+1 of each row are the output
    num_accepted: torch.Tensor  # [B] int64, drafts accepted (0..K)

    def packed(self) -> torch.Tensor:
        """[B, K+2]: num_accepted then the tokens, so one host copy fetches a whole step."""
        return torch.cat([self.num_accepted[:, None], self.tokens], dim=1)

    def last_token(self) -> torch.Tensor:
        """[B] the last emitted token of each row (stays on the device: the next step's input)."""
        return self.tokens.gather(1, self.num_accepted[:, None])[:, 0]


def _expand_rows(st: SamplingTensors, repeat: int) -> SamplingTensors:
    """The same settings for ``repeat`` consecutive rows per original row (flattened [B*R])."""
    if repeat == 1:
        return st
    return replace(
        st,
        temperature=st.temperature.repeat_interleave(repeat),
        top_k=st.top_k.repeat_interleave(repeat),
        top_p=st.top_p.repeat_interleave(repeat),
        repetition_penalty=st.repetition_penalty.repeat_interleave(repeat),
    )


def probs_from_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Sampling distribution for ``logits`` [B, T, V] with temperature/top-k/top-p of ``st`` ([B]).

    Target and draft must both go through this function so the two distributions are filtered by
    identical rules. Returns float32 [B, T, V].
    """
    bsz, seq, vocab = logits.shape
    flat = filter_logits(logits.float().reshape(bsz * seq, vocab), _expand_rows(st, seq))
    return flat.softmax(dim=-1).reshape(bsz, seq, vocab)


def sample_from_probs(
    probs: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One draw per row of unnormalised ``probs`` [..., V] by the exponential race (no sync)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def verify_greedy(
    target_logits: torch.Tensor, draft_tokens: torch.Tensor, num_drafts: int | None = None
) -> VerifyResult:
    """target_logits [B, K+1, V] (row i scores the token after draft i-1); draft_tokens [B, K].

    ``num_drafts``: only the first ones are real drafts, the rest padding (a fixed width lets a
    compiled verify step keep one shape); padding is never accepted.
    """
    target_tokens = target_logits.argmax(dim=-1)  # [B, K+1]
    k = draft_tokens.shape[1]
    match = draft_tokens == target_tokens[:, :k]  # [B, K]
    if num_drafts is not None and num_drafts < k:
        match[:, num_drafts:] = False
    num_accepted = match.long().cumprod(dim=1).sum(dim=1)  # [B] length of the matching prefix
    # Accepted drafts equal the target's argmax, so the output is simply the argmax row.
    return VerifyResult(target_tokens, num_accepted)


def verify_sampling(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None = None,
    num_drafts: int | None = None,
) -> VerifyResult:
    """Rejection sampling.

    target_probs [B, K+1, V]: the target's filtered distributions (``probs_from_logits``);
    draft_tokens [B, K]; draft_probs [B, K, V] the distributions the drafts were drawn from, or
    None for a deterministic drafter (q is then one-hot at the drafted token). ``num_drafts``: as
    for ``verify_greedy`` (padding is rejected and the row after the last real draft is p).
    """
    bsz, k1, vocab = target_probs.shape
    k = k1 - 1
    idx = draft_tokens[..., None]  # [B, K, 1]
    p_draft = target_probs[:, :k].gather(-1, idx)[..., 0]  # [B, K] p_i(d_i)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
        # max(p - onehot(d), 0) is p with the drafted entry zeroed.
        residual = target_probs[:, :k].scatter(-1, idx, 0.0)  # [B, K, V]
    else:
        q_draft = draft_probs.gather(-1, idx)[..., 0]  # [B, K]
        residual = (target_probs[:, :k] - draft_probs).clamp_min(0.0)  # [B, K, V]
    # A rejection has probability sum(max(p - q, 0)); if that is zero (p == q up to rounding) the
    # row can only be reached by rounding, and p itself is the right distribution to fall back on.
    empty = residual.sum(dim=-1, keepdim=True) <= 0  # [B, K, 1]
    residual = torch.where(empty, target_probs[:, :k], residual)
    u = torch.rand(p_draft.shape, device=p_draft.device, generator=generator)  # [B, K]
    # u < p/q without dividing (q(d) > 0 for a drawn d; u < 1 accepts whenever p >= q).
    accept = u * q_draft < p_draft  # [B, K]
    if num_drafts is not None and num_drafts < k:
        accept[:, num_drafts:] = False
        residual[:, num_drafts:] = target_probs[:, num_drafts:k]  # no draft there: plain p
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # [B]
    # Row i < K: replacement after rejecting draft i; row K: the bonus token from p_K.
    dists = torch.cat([residual, target_probs[:, k:]], dim=1)  # [B, K+1, V]
    drawn = sample_from_probs(dists, generator)  # [B, K+1]
    padded = torch.cat([draft_tokens, drawn[:, k:]], dim=1)  # [B, K+1]
    pos = torch.arange(k1, device=drawn.device)[None]  # [1, K+1]
    n = num_accepted[:, None]
    tokens = torch.where(pos < n, padded, drawn)  # drafts before n, the draw at n
    return VerifyResult(tokens, num_accepted)


def verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    st: SamplingTensors,
    generator: torch.Generator | None = None,
    num_drafts: int | None = None,
) -> VerifyResult:
    """Greedy or rejection-sampling verification according to ``st`` (all rows alike)."""
    if st.all_greedy:
        return verify_greedy(target_logits, draft_tokens, num_drafts)
    probs = probs_from_logits(target_logits, st)
    return verify_sampling(probs, draft_tokens, draft_probs, generator, num_drafts)
