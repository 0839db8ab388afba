"""The state of one request in the serving engine (plain Python: no tensors).

A request's known tokens are its prompt plus every token sampled so far. ``num_computed_tokens``
counts how many of them already have keys and values in the paged cache; the scheduler runs the
rest (a prefill chunk, a decode token, or a recompute after preemption) and nothing else.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

from llmopt.sampling.params import SamplingParams


class Detokenizer(Protocol):
    """What a request needs from ``IncrementalDetokenizer`` (a fake one serves in tests)."""

    text: str

    def add(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    detok: Detokenizer | None = None
    arrival_time: float = field(default_factory=time.perf_counter)

    output_token_ids: list[int] = field(default_factory=list)
    # prompt + outputs, kept as one list so slicing a chunk or hashing a block never copies twice
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first admission (-1: not admitted yet)
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full blocks
    first_token_time: float | None = None
    ttft_reported: bool = False
    finish_time: float | None = None
    emitted_chars: int = 0  # characters of detok.text already handed out
    cut_at_stop: bool = False

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def max_total_tokens(self) -> int:
        """The most tokens this request can ever hold in the cache."""
        return min(self.num_prompt_tokens + self.params.max_new_tokens, self.max_model_len)

    def update_block_hashes(self, block_size: int) -> list[int]:
        """Extend the chained hashes to every full block of known tokens."""
        full = self.num_tokens // block_size
        parent = self.block_hashes[-1] if self.block_hashes else 0
        for i in range(len(self.block_hashes), full):
            # Chaining makes a block's hash name its whole prefix, so equal hashes mean equal
            # contexts (Python hashes ints and tuples of ints deterministically).
            parent = hash((parent, tuple(self.all_token_ids[i * block_size:(i + 1) * block_size])))
            self.block_hashes.append(parent)
        return self.block_hashes

    def append_output_token(self, token_id: int) -> bool:
        """Record a sampled token; returns True when the request has just finished."""
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        p = self.params
        if token_id in self.eos_token_ids and not p.ignore_eos:
            return self._finish("stop")
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.detok is not None:
            self.detok.add(token_id)
            if p.stop and self._hit_stop():
                return self._finish("stop")
        if len(self.output_token_ids) >= p.max_new_tokens or self.num_tokens >= self.max_model_len:
            return self._finish("length")
        return False

    def _finish(self, reason: str) -> bool:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.finish_time = time.perf_counter()
        return True

    def _hit_stop(self) -> bool:
        assert self.detok is not None
        text = self.detok.text
        stops = self.params.stop
        # Only the tail can hold a newly completed stop string.
        window = max(len(s) for s in stops) + 16
        start = max(0, min(self.emitted_chars, len(text) - window))
        cut = min((i for s in stops if (i := text.find(s, start)) >= 0), default=-1)
        if cut < 0:
            return False
        self.detok.text = text[:cut]
        self.cut_at_stop = True
        return True

    def take_text_delta(self) -> str:
        """New text since the last call; holds back a tail that could still become a stop string."""
        if self.detok is None:
            return ""
        if self.finished:
            if not self.cut_at_stop:
                self.detok.flush()
            upto = len(self.detok.text)
        else:
            hold = max((len(s) - 1 for s in self.params.stop), default=0)
            upto = max(len(self.detok.text) - hold, self.emitted_chars)
        delta = self.detok.text[self.emitted_chars:upto]
        self.emitted_chars = max(upto, self.emitted_chars)
        return delta

    @property
    def text(self) -> str:
        return self.detok.text if self.detok is not None else ""
