"""Token sampling on the device, with no host synchronisation.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which draws from p exactly
like ``torch.multinomial`` but needs no sync and compiles into a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.sampling.params import SamplingParams


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] float32, 1 = off
    repetition_penalty: torch.Tensor  # [B] float32, 1 = off
    use_top_k: bool
    use_top_p: bool
    use_penalty: bool
    all_greedy: bool

    @classmethod
    def from_params(cls, params: list[SamplingParams], device: torch.device) -> SamplingTensors:
        def t(values: list[float], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=t([p.temperature for p in params], torch.float32),
            top_k=t([p.top_k for p in params], torch.int64),
            top_p=t([p.top_p for p in params], torch.float32),
            repetition_penalty=t([p.repetition_penalty for p in params], torch.float32),
            use_top_k=any(p.top_k > 0 for p in params),
            use_top_p=any(p.top_p < 1 for p in params),
            use_penalty=any(p.repetition_penalty != 1 for p in params),
            all_greedy=all(p.greedy for p in params),
        )


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """CTRL-style penalty (as in transformers): divide positive, multiply negative logits."""
    # logits: [B, V] float32; seen: [B, V] bool; penalty: [B]
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Temperature, then top-k, then top-p; filtered entries become -inf."""
    temp = torch.where(st.temperature > 0, st.temperature, torch.ones_like(st.temperature))
    logits = logits / temp[:, None]
    if not (st.use_top_k or st.use_top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    vocab = logits.shape[-1]
    if st.use_top_k:
        k = torch.where(st.top_k > 0, st.top_k, torch.full_like(st.top_k, vocab)).clamp(max=vocab)
        ranks = torch.arange(vocab, device=logits.device)[None]
        sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    if st.use_top_p:
        probs = sorted_logits.softmax(dim=-1)
        # Keep a token when the mass strictly before it is < top_p (so the first always stays).
        before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(before >= st.top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    st: SamplingTensors,
    generators: list[torch.Generator | None] | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row. logits: [B, V] (any float dtype). Returns [B] int64."""
    logits = logits.float()
    if st.use_penalty and seen is not None:
        logits = apply_repetition_penalty(logits, seen, st.repetition_penalty)
    greedy_tokens = logits.argmax(dim=-1)
    if st.all_greedy:
        return greedy_tokens
    probs = filter_logits(logits, st).softmax(dim=-1)  # [B, V]
    noise = torch.empty_like(probs)
    if generators is None or all(g is None for g in generators):
        noise.exponential_()
    elif len(generators) == 1:
        noise.exponential_(generator=generators[0])
    else:
        for i, g in enumerate(generators):
            noise[i].exponential_(generator=g)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(st.temperature > 0, sampled, greedy_tokens)
