"""Choosing how many tokens to draft from the acceptance seen so far.

With per-token acceptance rate ``a`` a step that drafts k tokens emits on average
``E(k) = 1 + a + ... + a^k`` tokens and costs ``c(k)`` plain decode steps. The controller picks the
k in [0, k_max] with the best ratio E(k) / c(k); k = 0 is plain decoding, chosen when drafting does
not pay. While at k = 0 it still probes with one drafted token, so that a drafter that becomes
good again (n-gram lookup reaching repeated text) is noticed: every ``probe_every`` steps at first,
the interval doubling up to ``probe_max`` each time a probe drafted and drafting still does not
pay (a probe can cost two plain steps on a small GPU model, and a drafter that keeps failing
should cost little). A probe the drafter had nothing for (n-gram lookup without a match) cost
no compute and does not lengthen the interval: the drafter is asked again after
``free_probe_gap`` plain steps. Not at once: a probe step waits for its token on the host, and
the plain steps between probes run without that sync (on a launch-bound GPU model a synced step
measured 0.79 ms against 0.68 ms), while a match found a few steps late loses little.

The cost c(k) is measured where it can be (``StepCosts``: the wall-clock time of the steps that
drafted k tokens over that of plain steps, kept across requests), and otherwise modelled as
``1 + k * (verify_cost + draft_cost)``. The model is only a prior: on a small model whose steps are
bound by kernel launches a 5-token verify can cost 1.6 plain steps, not the 1.1 that bandwidth
alone predicts, and a draft with half the target's layers half a step per token whatever its bytes.
With measured costs the controller also explores now and then: a plain step, to know what drafting
is compared with, and the draft lengths next to the current best.
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
    probe_max: int = 256  # the longest run of plain steps between probes (doubling from probe_every)
    free_probe_gap: int = 3  # plain steps before asking again a drafter that had nothing

    def __post_init__(self) -> None:
        if self.k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {self.k_max}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.verify_cost < 0:
            raise ValueError(f"verify_cost must be >= 0, got {self.verify_cost}")


class StepCosts:
    """Wall-clock seconds of a speculative step by how many tokens it drafted (0 = a plain step):
    an exponential moving average per draft length, kept across requests (the costs belong to the
    model, drafter and device, not to the text)."""

    def __init__(self, k_max: int, decay: float = 0.8) -> None:
        self.decay = decay
        self.seconds: list[float | None] = [None] * (k_max + 1)
        self._seen = [-1] * (k_max + 1)  # when each length was last observed (observation count)
        self._count = 0

    def observe(self, drafted: int, seconds: float) -> None:
        if not 0 <= drafted < len(self.seconds):
            return
        self._count += 1
        self._seen[drafted] = self._count
        old = self.seconds[drafted]
        if old is None or seconds < old / 3:
            # the first, or an estimate made of a one-off slow step (a compile or graph capture)
            self.seconds[drafted] = seconds
        else:  # one slow step (the host preempted) moves the estimate by a bounded amount
            self.seconds[drafted] = self.decay * old + (1 - self.decay) * min(seconds, 3 * old)

    def relative(self, drafted: int) -> float | None:
        """Cost of a step that drafts ``drafted`` tokens in plain steps, if both were measured."""
        plain, t = self.seconds[0], self.seconds[drafted]
        return t / plain if plain and t is not None else None

    def stalest(self, candidates: list[int]) -> int:
        """The candidate observed longest ago (or never)."""
        return min(candidates, key=lambda k: self._seen[k])

    def as_dict(self) -> dict[str, float]:
        """Measured milliseconds per step, by drafted tokens."""
        return {str(k): round(t * 1e3, 3) for k, t in enumerate(self.seconds) if t is not None}


class AdaptiveK:
    def __init__(self, config: AdaptiveKConfig, draft_cost: float, costs: StepCosts | None = None) -> None:
        self.config = config
        self.draft_cost = draft_cost
        self.costs = costs
        self._accepted = config.prior_rate * config.prior_weight
        self._trials = config.prior_weight
        self._plain_steps = 0
        self._probe_gap = config.probe_every
        self._probing = False
        self._steps = 0

    def step_cost(self, k: int) -> float:
        """Cost of a step drafting k tokens, in plain steps: measured, else modelled."""
        if k == 0:
            return 1.0
        measured = self.costs.relative(k) if self.costs is not None else None
        if measured is not None:
            return measured
        return 1.0 + k * (self.config.verify_cost + self.draft_cost)

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
            ratio = expected / self.step_cost(k)
            if ratio > best * 1.0001:  # ties go to the shorter draft
                best_k, best = k, ratio
        return best_k

    def next_k(self) -> int:
        cfg = self.config
        if not cfg.adaptive:
            return cfg.k_max
        k = self.best_k()
        self._steps += 1
        costs = self.costs
        if k > 0 and costs is not None and cfg.k_max > 0:
            # Explore with measured costs: the first plain step early (drafting is judged against
            # it), then every probe_every steps whichever of plain, k - 1 and k + 1 is stalest.
            first_plain = costs.seconds[0] is None and self._steps == 2
            if first_plain or self._steps % cfg.probe_every == 0:
                near = [j for j in (0, k - 1, k + 1) if 0 <= j <= cfg.k_max and j != k]
                return 0 if first_plain else costs.stalest(near)
        if k > 0:
            self._plain_steps = 0
            self._probe_gap = cfg.probe_every  # drafting pays again: probe soon if it stops
            return k
        self._plain_steps += 1
        if self._plain_steps >= self._probe_gap and cfg.k_max > 0:
            self._plain_steps = 0
            self._probing = True
            return 1
        return 0

    def update(self, drafted: int, accepted: int) -> None:
        """One verify step: ``accepted`` of ``drafted`` tokens kept (a prefix)."""
        if self._probing:
            self._probing = False
            if drafted > 0:  # a real probe: the next waits twice as long unless drafting resumes
                self._probe_gap = min(2 * self._probe_gap, max(self.config.probe_max, self.config.probe_every))
            else:  # the drafter had nothing: no compute spent, so ask again free_probe_gap steps on
                self._plain_steps = max(0, self._probe_gap - self.config.free_probe_gap - 1)
        if drafted <= 0:
            return
        # Tokens actually tested: the accepted ones plus the first rejected one (the rest were never
        # judged on their own), which makes accepted / trials the geometric-rate estimate.
        trials = accepted + (1 if accepted < drafted else 0)
        d = self.config.decay
        self._accepted = d * self._accepted + accepted
        self._trials = d * self._trials + trials
