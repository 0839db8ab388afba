"""Speculative generation at batch size 1: draft k tokens, verify them in one target forward.

Target state between steps: its static KV cache holds every committed token except the last one
emitted (``pending``, at position ``pos``). A step feeds ``[pending, d_1 .. d_m]`` at positions
``pos .. pos+m`` in one forward, verifies, and emits ``n`` accepted drafts plus one token from the
target. Rejected positions are rolled back by moving ``pos`` only: the cache is written by position
and attention masks keys by position, so stale entries past ``pos`` are overwritten before any
query can see them. One host copy per step fetches the emitted tokens; plain steps (k = 0) run
without a sync, the host reading each token while the next step runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from llmopt.devices import HostTokens, synchronize
from llmopt.engine.generate import Generator, StreamCallback, _Row
from llmopt.engine.outputs import GenerationStats, RequestOutput
from llmopt.errors import UserError
from llmopt.loading.tokenizer import IncrementalDetokenizer, Tokenizer
from llmopt.sampling import SamplingParams, SamplingTensors, sample
from llmopt.sampling.verify import verify
from llmopt.speculative.adaptive import AdaptiveK, AdaptiveKConfig, StepCosts
from llmopt.speculative.drafters import Drafter


@dataclass
class SpeculativeStats:
    drafter: str
    k_max: int
    adaptive: bool
    steps: int = 0  # target forwards after the prefill
    draft_steps: int = 0  # of which verified at least one drafted token
    drafted: int = 0
    accepted: int = 0
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    k_histogram: dict[int, int] = field(default_factory=dict)  # drafted length -> steps
    accepted_by_k: dict[int, int] = field(default_factory=dict)  # drafted length -> accepted
    plain_decode_tokens_per_s: float | None = None
    speculative_decode_tokens_per_s: float | None = None
    # adaptive k's measured step times (ms by drafted tokens), None where k was chosen by the model
    step_ms: dict[str, float] | None = None

    def __post_init__(self) -> None:
        self.drafted_by_position = [0] * self.k_max
        self.accepted_by_position = [0] * self.k_max

    def record(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.k_histogram[drafted] = self.k_histogram.get(drafted, 0) + 1
        if drafted == 0:
            return
        self.draft_steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.accepted_by_k[drafted] = self.accepted_by_k.get(drafted, 0) + accepted
        for i in range(drafted):
            self.drafted_by_position[i] += 1
            if i < accepted:
                self.accepted_by_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_by_position(self) -> list[float | None]:
        """P(draft i accepted | draft i was proposed), i = 1..k_max."""
        return [a / d if d else None for a, d in
                zip(self.accepted_by_position, self.drafted_by_position, strict=True)]

    @property
    def mean_accepted_per_step(self) -> float:
        """Drafted tokens accepted per verify step that had drafts (the bonus token excluded)."""
        return self.accepted / self.draft_steps if self.draft_steps else 0.0

    @property
    def mean_accepted_per_full_step(self) -> float | None:
        """Drafts accepted per step that drafted all k_max tokens: the rate "at k" proper, without
        the steps whose drafts the token budget cut short (the last ones of a request)."""
        steps = self.k_histogram.get(self.k_max, 0)
        return self.accepted_by_k.get(self.k_max, 0) / steps if steps else None

    @property
    def mean_tokens_per_step(self) -> float:
        """Tokens emitted per target forward after the prefill (accepted drafts + 1)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def speedup(self) -> float | None:
        if not self.plain_decode_tokens_per_s or self.speculative_decode_tokens_per_s is None:
            return None
        return self.speculative_decode_tokens_per_s / self.plain_decode_tokens_per_s

    def as_dict(self) -> dict[str, object]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 4)

        return {
            "drafter": self.drafter,
            "k_max": self.k_max,
            "adaptive_k": self.adaptive,
            "steps": self.steps,
            "draft_steps": self.draft_steps,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": r(self.acceptance_rate),
            "acceptance_by_position": [r(x) for x in self.acceptance_by_position],
            "mean_accepted_per_step": r(self.mean_accepted_per_step),
            "mean_accepted_per_full_step": r(self.mean_accepted_per_full_step),
            "mean_tokens_per_step": r(self.mean_tokens_per_step),
            "k_histogram": {str(k): v for k, v in sorted(self.k_histogram.items())},
            "accepted_by_k": {str(k): v for k, v in sorted(self.accepted_by_k.items())},
            "step_costs": "modelled" if self.step_ms is None else "measured",
            "step_ms_by_drafted": self.step_ms,
            "plain_decode_tokens_per_s": r(self.plain_decode_tokens_per_s),
            "speculative_decode_tokens_per_s": r(self.speculative_decode_tokens_per_s),
            "speedup": r(self.speedup),
        }


@dataclass(frozen=True)
class SpeculativeConfig:
    k: int = 4
    adaptive: bool = True
    verify_cost: float | None = None  # None: a default for the device (see AdaptiveKConfig)
    compare_plain: bool = False  # also run plain decoding with the same settings, for the speedup
    # Compile the target's verify step and the draft's one-token step (torch.compile; CUDA graphs
    # with "reduce-overhead"). Both then read the whole static cache, whose size stays fixed.
    compile: bool = False
    compile_mode: str = "auto"  # engine.compile.resolve_compile_mode
    max_seq_len: int | None = None  # fixed cache size when compiled (default: grown as needed)
    # Adaptive k by measured step times (else by the cost model alone). Off where several
    # processes must choose the same k each step without talking: tensor-parallel ranks.
    measured_costs: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise UserError(f"--speculate-k must be >= 1, got {self.k}")
        if self.verify_cost is not None and self.verify_cost < 0:
            raise ValueError(f"verify_cost must be >= 0, got {self.verify_cost}")


class SpeculativeGenerator(Generator):
    """Drop-in for ``Generator`` (same ``generate`` signature and outputs) that speculates.

    ``RequestOutput.extra["speculative"]`` holds the ``SpeculativeStats`` dict. With
    ``compare_plain``, ``plain`` (default: a ``Generator`` of the model compiled as this one is)
    decodes each prompt first, on the same KV cache, for the speedup.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | None,
        device: torch.device,
        drafter: Drafter,
        config: SpeculativeConfig | None = None,
        plain: Generator | None = None,
    ) -> None:
        super().__init__(model, tokenizer, device)
        self.drafter = drafter
        self.spec = config or SpeculativeConfig()
        self.last_stats: SpeculativeStats | None = None
        # adaptive k's measured step costs, kept across requests (see adaptive.py)
        self.step_costs = StepCosts(self.spec.k)
        self._verify_graph = None
        self._plain = plain
        if self.spec.compile:
            from llmopt.engine.compile import compile_step, resolve_compile_mode

            # One graph per verified width (1..k+1): static shapes, so each can be a CUDA graph.
            self.fixed_seq_len = self.spec.max_seq_len or 0
            mode = self.compile_mode = resolve_compile_mode(self.spec.compile_mode, device)
            # regional: one compiled layer for every layer and width, each width its own graph
            self._verify_graph = compile_step(self._verify_static, model, mode, device)
            enable = getattr(drafter, "enable_compile", None)
            if callable(enable):
                enable(mode)

    def plain_generator(self) -> Generator:
        """What ``compare_plain`` measures against: the same settings without speculation."""
        if self._plain is None:
            self._plain = Generator(self.model, self.tokenizer, self.device, compile=self.spec.compile,
                                    compile_mode=self.spec.compile_mode, max_seq_len=self.spec.max_seq_len)
        return self._plain

    def cache_positions(self, total: int) -> int:
        # room for a full-width verify at the last position (compiled steps keep one width)
        return total + self.spec.k + 1

    def warm_up(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        super().warm_up(prompts, max_new_tokens)  # with compare_plain, the plain generator's too
        if self._verify_graph is None:
            return
        # Both verify widths (1: nothing drafted; k+1), which a short run need not reach (a
        # drafter may find nothing to propose in it). They write keys and values at positions
        # 0..k of dummy tokens, which the next prefill overwrites.
        with torch.inference_mode():
            for width in (1, self.spec.k + 1):
                tokens = torch.zeros(1, width, dtype=torch.long, device=self.device)
                positions = torch.arange(width, device=self.device)[None]
                self._verify_forward(tokens, positions, width)

    def _verify_static(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # tokens, positions: [1, T]; reads the whole static cache (masked by position)
        return self.model(tokens, positions)  # [1, T, V]

    def _verify_forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        if self._verify_graph is not None:
            # Earlier graph outputs (draft steps, last verify) are consumed: their memory may be reused.
            torch.compiler.cudagraph_mark_step_begin()
            return self._verify_graph(tokens, positions)
        return self.model(tokens, positions, kv_len=kv_len)

    def _adaptive(self, measured: bool) -> AdaptiveK:
        """``measured``: choose k by the step times measured so far (else by the cost model
        alone, which keeps a seeded sampling run's draws, and so its tokens, reproducible)."""
        verify_cost = self.spec.verify_cost
        if verify_cost is None:
            # A CPU runs out of compute before bandwidth: each verified token costs real time.
            verify_cost = 0.15 if self.device.type == "cpu" else 0.03
        cfg = AdaptiveKConfig(k_max=self.spec.k, adaptive=self.spec.adaptive, verify_cost=verify_cost)
        costs = self.step_costs if measured and self.spec.adaptive and self.spec.measured_costs else None
        return AdaptiveK(cfg, self.drafter.cost_per_token, costs)

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        stream: StreamCallback | None = None,
    ) -> list[RequestOutput]:
        if len(prompts) != 1:
            raise UserError(
                f"speculative decoding runs one prompt at a time (batch size 1); got {len(prompts)}"
            )
        if params.repetition_penalty != 1.0:
            raise UserError("speculative decoding does not support --repetition-penalty; drop --draft")
        plain = None
        if self.spec.compare_plain:
            gen = self.plain_generator()
            # this generator's cache size for both (at least this run's): neither's graphs are
            # then re-specialised or dropped
            needed = self.cache_positions(self._check_lengths(prompts, params.max_new_tokens))
            gen.reserve(1, max(needed, self.fixed_seq_len or 0))
            plain = gen.generate(prompts, params)[0]
            assert plain.stats is not None
        out = self._generate_one(prompts[0], params, stream)
        assert self.last_stats is not None
        self.last_stats.plain_decode_tokens_per_s = plain.stats.decode_tokens_per_s if plain else None
        out.extra["speculative"] = self.last_stats.as_dict()
        if plain is not None and params.temperature == 0:
            # greedy: speculation must not change a single token
            out.extra["speculative"]["same_tokens_as_plain"] = plain.token_ids == out.token_ids
        return [out]

    @torch.inference_mode()
    def _generate_one(
        self, prompt: list[int], params: SamplingParams, stream: StreamCallback | None
    ) -> RequestOutput:
        t_start = time.perf_counter()
        total = self._check_lengths([prompt], params.max_new_tokens)
        length = len(prompt)
        max_new = min(params.max_new_tokens, total - length)
        self._ensure_cache(1, self.cache_positions(total))
        cache_len = self.model.max_seq_len
        dev = self.device
        eos = frozenset() if params.ignore_eos or self.tokenizer is None else self.tokenizer.eos_token_ids
        if not eos and not params.ignore_eos and self.config.eos_token_ids:
            eos = frozenset(self.config.eos_token_ids)
        row = _Row(prompt, IncrementalDetokenizer(self.tokenizer, prompt) if self.tokenizer else None)
        st = SamplingTensors.from_params([params], dev)
        gen = draft_gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=dev).manual_seed(params.seed)
            draft_gen = torch.Generator(device=dev).manual_seed(params.seed + 1)
        arange = torch.arange(cache_len + 1, device=dev)  # sliced by host ints: no copies
        # Seeded sampling: k from the cost model only, so that the same seed draws the same tokens.
        adaptive = self._adaptive(measured=params.greedy or params.seed is None)
        costs = adaptive.costs
        stats = SpeculativeStats(self.drafter.name, self.spec.k, self.spec.adaptive)

        tokens = torch.tensor([prompt], dtype=torch.long, device=dev)  # [1, L]
        logits = self.model(tokens, arange[:length][None], kv_len=length,
                            logits_idx=arange[length - 1 : length])  # [1, 1, V]
        pending = sample(logits[:, -1], st, [gen] if gen is not None else None)  # [1]
        first = int(pending.item())
        self.drafter.start(prompt, cache_len, st, draft_gen)
        synchronize(dev)
        t_first = time.perf_counter()
        ids = [*prompt, first]  # the tokens emitted so far: len(ids) - length
        self._accept([row], [first], params, eos, stream)
        pos = length  # position of the pending token

        def emit(t: int) -> None:
            ids.append(t)
            self._accept([row], [t], params, eos, stream)

        def choose_k(in_flight: int) -> int:
            # Never draft past max_new_tokens (``in_flight`` tokens are emitted but not yet read)
            # or the cache: the step emits up to k+1 tokens.
            return min(adaptive.next_k(), max_new - (len(ids) - length) - in_flight - 1, cache_len - 1 - pos)

        no_drafts = torch.zeros(1, 0, dtype=torch.long, device=dev)
        k_next: int | None = None  # chosen at the end of a run of plain steps
        while not row.finished and len(ids) - length < max_new:
            t_step = time.perf_counter()  # the last step ended in a sync: the device is idle
            k = k_next if k_next is not None else choose_k(0)
            k_next = None
            if k == 0:
                # Plain steps until adaptive k drafts again, without a sync per step: the host
                # reads each token while the next step runs, as Generator's loop does (so it may
                # run one step past an end-of-sequence token, which is dropped).
                steps, in_flight = 0, None
                while True:
                    logits = self._verify_forward(pending[:, None], arange[pos : pos + 1][None], pos + 1)
                    pending = verify(logits, no_drafts, None, st, gen).last_token()  # [1]
                    del logits
                    pos += 1
                    steps += 1
                    stats.record(0, 0)
                    if in_flight is not None:
                        emit(in_flight.get()[0])
                    in_flight = HostTokens(pending)
                    if row.finished or len(ids) - length + 1 >= max_new:
                        break
                    k_next = choose_k(1)
                    if k_next != 0:
                        break
                    k_next = None
                emit(in_flight.get()[0])
                if costs is not None:
                    costs.observe(0, (time.perf_counter() - t_step) / steps)
                continue
            prop = self.drafter.propose(ids, k)
            m = prop.num_tokens
            drafts, probs = prop.tokens, prop.probs
            width = m
            if self._verify_graph is not None and 0 < m < self.spec.k and pos + self.spec.k < cache_len:
                # Pad to k drafts so the compiled verify sees two widths only (1 and k+1).
                width = self.spec.k
                drafts = torch.cat([drafts, drafts.new_zeros(1, width - m)], dim=1)  # [1, k]
                if probs is not None:
                    probs = torch.cat([probs, probs.new_ones(1, width - m, probs.shape[-1])], dim=1)
            inp = torch.cat([pending[:, None], drafts], dim=1)  # [1, width+1]
            logits = self._verify_forward(inp, arange[pos : pos + width + 1][None], pos + width + 1)
            res = verify(logits, drafts, probs, st, gen, num_drafts=m if width > m else None)
            del logits  # a compiled step's output buffer: drop it before the next replay
            pending = res.last_token()  # [1], stays on the device for the next step's input
            host = res.packed()[0].tolist()  # the one device->host copy per step
            if costs is not None:
                costs.observe(m, time.perf_counter() - t_step)
            n = host[0]
            new = host[1 : n + 2]
            self.drafter.accept(n)
            adaptive.update(m, n)
            stats.record(m, n)
            for t in new:
                emit(t)
                if row.finished:
                    break
            pos += n + 1
        self._finish_text(0, row, stream)
        t_end = time.perf_counter()
        gstats = GenerationStats(length, len(row.token_ids), t_first - t_start, t_end - t_first,
                                 t_end - t_start)
        stats.speculative_decode_tokens_per_s = gstats.decode_tokens_per_s
        stats.step_ms = costs.as_dict() if costs is not None else None
        self.last_stats = stats
        return RequestOutput(None, prompt, row.text, row.token_ids, row.finish_reason, gstats)
