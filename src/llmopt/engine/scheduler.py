"""Continuous-batching scheduler (plain Python; tested with fake model outputs, no model).

Each step gives every chosen request one number, the tokens it runs now: a prefill chunk, the
rest of a prompt after a prefix-cache hit, one decode token, or a recompute after preemption.
Running requests go first (first come, first served), then waiting ones while blocks, the
per-step token budget and the sequence cap allow. When a running request needs a block and
none is free, the most recently admitted request is preempted: its blocks are freed and it goes
back to the front of the queue with all its tokens, to be recomputed later (its own full blocks
often still sit in the prefix cache, so the recompute is mostly hits).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from llmopt.engine.block_manager import BlockManager
from llmopt.engine.request import Request, RequestStatus
from llmopt.sampling.params import SamplingParams


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduledSeq:
    """One request's share of a step: what the model runner needs, nothing more."""

    req_id: str
    token_ids: list[int]  # the tokens to run now
    start_pos: int  # position of token_ids[0] (= tokens already in the cache)
    block_ids: list[int]  # the request's whole block table
    params: SamplingParams
    sample: bool  # this chunk reaches the last known token: sample the next one
    all_token_ids: list[int]  # prompt + outputs so far (for repetition penalty)


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    num_scheduled_tokens: int = 0
    preempted_req_ids: list[str] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)  # since the last step

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]  # the scheduled requests with sample=True, in order
    sampled_token_ids: list[int]


@dataclass
class RequestUpdate:
    """What one step changed for one request."""

    request: Request
    new_token_ids: list[int]
    finished: bool


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []
        self.num_preemptions = 0

    # -- requests in and out ---------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        need = self.block_manager.blocks_needed(req.max_total_tokens())
        if need > self.config.num_blocks:
            # Even alone it could not finish: it would preempt itself forever.
            raise ValueError(f"request needs {need} KV blocks, the pool has {self.config.num_blocks}")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        aborted = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.finished:
                continue
            if req in self.running:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = RequestStatus.FINISHED
            req.finish_reason = "abort"
            self._release(req)
            aborted.append(req)
        return aborted

    def _release(self, req: Request) -> None:
        self.block_manager.free_request(req)
        self.requests.pop(req.request_id, None)
        self._finished_ids.append(req.request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        bm = self.block_manager
        out = SchedulerOutput(finished_req_ids=self._finished_ids)
        self._finished_ids = []
        budget = cfg.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            assert num_new > 0, "a running request has nothing to compute"
            while not bm.allocate_slots(req, num_new):
                victim = self.running.pop()  # the latest admitted; never one scheduled already
                self._preempt(victim)
                out.preempted_req_ids.append(victim.request_id)
                if victim is req:
                    break
            else:
                self._schedule(req, num_new, out)
                budget -= num_new
                i += 1
                continue
            break

        # Admitting while preempting would only thrash: the freed blocks go to the running ones.
        while (self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs
               and not out.preempted_req_ids):
            req = self.waiting[0]
            hits, num_hit = bm.get_computed_blocks(req)
            num_new = min(req.num_tokens - num_hit, budget)
            if not bm.allocate_slots(req, num_new, hits):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._schedule(req, num_new, out)
            budget -= num_new
        return out

    def _schedule(self, req: Request, num_new: int, out: SchedulerOutput) -> None:
        start = req.num_computed_tokens
        out.seqs.append(ScheduledSeq(
            req_id=req.request_id,
            token_ids=req.all_token_ids[start:start + num_new],
            start_pos=start,
            block_ids=self.block_manager.block_table(req.request_id),
            params=req.params,
            sample=start + num_new == req.num_tokens,
            all_token_ids=req.all_token_ids,
        ))
        out.num_scheduled_tokens += num_new
        # Counted now, as if the step already ran: the next schedule() sees them computed.
        req.num_computed_tokens = start + num_new

    def _preempt(self, req: Request) -> None:
        self.block_manager.free_request(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(
        self, sched: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[RequestUpdate]:
        """Append sampled tokens, finish requests (EOS, stop string, length) and free their blocks."""
        updates = []
        for rid, token in zip(result.req_ids, result.sampled_token_ids, strict=True):
            req = self.requests.get(rid)
            if req is None or req.finished:
                continue
            before = len(req.output_token_ids)
            done = req.append_output_token(token)
            if done:
                self.running.remove(req)
                self._release(req)
            # EOS ends a request without becoming one of its tokens.
            updates.append(RequestUpdate(req, req.output_token_ids[before:], done))
        return updates
