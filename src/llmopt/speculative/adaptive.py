"""Choosing how many tokens to draft from the acceptance seen so far.

With per-token acceptance rate ``a`` a step that drafts k tokens emits on average
``E(k) = 1 + a + ... + a^k`` tokens and costs about ``1 + k * (verify_cost + draft_cost)`` plain
decode steps. The controller picks the k in [0, k_max] with the best ratio; k = 0 is plain decoding,
chosen when drafting does not pay. While at k = 0 it still probes with one drafted token every
``probe_every`` steps, so that a drafter that becomes good again (n-gram lookup reaching repeated
text) is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdaptiveKConfig:
    k_max: int = 4
    adaptive: bool = True
    # Extra cost of verifying one more token, relative to a plain decode step. At batch 1 a GPU
    # reads the weights once either way, so it is small; on CPUs compute shows sooner.
    verify_cost: float = 0.03
    decay: float = 0.9  # weight of past observations per step (about ten steps of memory)
    prior_rate: float = 0.6  # acceptance assumed before any evidence...
    prior_weight: float = 2.0  # ...worth this many drafted tokens
    probe_every: int = 16

    def __post_init__(self) -> None:
        if self.k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {self.k_max}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.verify_cost < 0:
            raise ValueError(f"verify_cost must be >= 0, got {self.verify_cost}")


class AdaptiveK:
    def __init__(self, config: AdaptiveKConfig, draft_cost: float) -> None:
        self.config = config
        self.draft_cost = draft_cost
        self._accepted = config.prior_rate * config.prior_weight
        self._trials = config.prior_weight
        self._plain_steps = 0

    @property
    def acceptance(self) -> float:
        """Current estimate of the per-token acceptance rate."""
        return self._accepted / self._trials if self._trials > 0 else 0.0

    def best_k(self) -> int:
        cfg = self.config
        a = min(self.acceptance, 0.999)
        best_k, best = 0, 1.0
        expected = 1.0
        for k in range(1, cfg.k_max + 1):
            expected += a**k
            ratio = expected / (1.0 + k * (cfg.verify_cost + self.draft_cost))
            if ratio > best * 1.0001:  # ties go to the shorter draft
                best_k, best = k, ratio
        return best_k

    def next_k(self) -> int:
        cfg = self.config
        if not cfg.adaptive:
            return cfg.k_max
        k = self.best_k()
        if k > 0:
            self._plain_steps = 0
            return k
        self._plain_steps += 1
        if self._plain_steps >= cfg.probe_every and cfg.k_max > 0:
            self._plain_steps = 0
            return 1
        return 0

    def update(self, drafted: int, accepted: int) -> None:
        """One verify step: ``accepted`` of ``drafted`` tokens kept (a prefix)."""
        if drafted <= 0:
            return
        # Tokens actually tested: the accepted ones plus the first rejected one (the rest were never
        # judged on their own), which makes accepted / trials the geometric-rate estimate.
        trials = accepted + (1 if accepted < drafted else 0)
        d = self.config.decay
        self._accepted = d * self._accepted + accepted
        self._trials = d * self._trials + trials
