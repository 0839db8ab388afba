"""The serving engine: scheduler + model runner, offline (``LLMEngine``) and async (server).

``LLMEngine.step()`` schedules, runs the model once, and turns sampled tokens into per-request
outputs (token ids and text deltas). ``AsyncLLMEngine`` steps it in a background thread and
feeds each request's outputs to an asyncio queue, so an HTTP handler can stream them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from llmopt.engine.model_runner import ModelRunner, RunnerConfig
from llmopt.engine.outputs import GenerationStats, RequestOutput
from llmopt.engine.request import Request
from llmopt.engine.scheduler import ModelRunnerOutput, Scheduler, SchedulerConfig
from llmopt.errors import UserError
from llmopt.loading.tokenizer import IncrementalDetokenizer, Tokenizer
from llmopt.sampling import SamplingParams

log = logging.getLogger(__name__)

# Histogram bucket bounds (seconds), as the Prometheus exposition reports them.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.5, 1.0)


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context length
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


class Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += value
        self.count += 1


@dataclass
class EngineMetrics:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    steps: int = 0


@dataclass
class StepOutput:
    """One request's news from one step."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int


def _stats(req: Request) -> GenerationStats:
    end = req.finish_time or time.perf_counter()
    first = req.first_token_time or end
    return GenerationStats(req.num_prompt_tokens, len(req.output_token_ids), first - req.arrival_time,
                           end - first, end - req.arrival_time)


class LLMEngine:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None, device: torch.device,
                 config: EngineConfig | None = None,
                 make_runner: Callable[[nn.Module, torch.device, RunnerConfig], ModelRunner] | None = None,
                 ) -> None:
        """``make_runner``: builds the model runner (tensor parallelism swaps in one that keeps
        the other ranks in step); default ``ModelRunner``."""
        self.config = config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        mc = model.config  # type: ignore[attr-defined]
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        self.runner = (make_runner or ModelRunner)(model, device, RunnerConfig(
            block_size=config.block_size, num_kv_blocks=config.num_kv_blocks,
            gpu_memory_utilization=config.gpu_memory_utilization, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=self.max_model_len,
            cuda_graphs=config.cuda_graphs))
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=self.runner.num_blocks, block_size=config.block_size,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, enable_prefix_caching=config.enable_prefix_caching))
        eos = tokenizer.eos_token_ids if tokenizer is not None else frozenset()
        self.eos_token_ids: frozenset[int] = eos or frozenset(mc.eos_token_ids or ())
        self.metrics = EngineMetrics()
        self._ids = itertools.count()

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        if not prompt_token_ids:
            raise UserError("empty prompt: give at least one token")
        if len(prompt_token_ids) >= self.max_model_len:
            raise UserError(f"prompt is {len(prompt_token_ids)} tokens; the context is "
                            f"{self.max_model_len}, so at most {self.max_model_len - 1} fit")
        vocab = self.model.config.vocab_size  # type: ignore[attr-defined]
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise UserError(f"token ids must lie in [0, {vocab})")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids) if self.tokenizer else None
        req = Request(rid, list(prompt_token_ids), params, self.eos_token_ids, self.max_model_len,
                      detok, arrival_time if arrival_time is not None else time.perf_counter())
        try:
            self.scheduler.add_request(req)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.metrics.prompt_tokens += len(prompt_token_ids)
        return rid

    def abort_request(self, request_id: str) -> bool:
        aborted = self.scheduler.abort_requests([request_id])
        for _ in aborted:
            self.metrics.requests_finished["abort"] = self.metrics.requests_finished.get("abort", 0) + 1
        return bool(aborted)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            # Still let the runner drop state of requests that finished or were aborted.
            result = self.runner.execute(sched) if sched.finished_req_ids else ModelRunnerOutput([], [])
        else:
            result = self.runner.execute(sched)
        updates = self.scheduler.update_from_output(sched, result)
        self.metrics.steps += 1
        outs = []
        for u in updates:
            req = u.request
            n_out = len(req.output_token_ids)
            self.metrics.generation_tokens += len(u.new_token_ids)
            if not req.ttft_reported and req.first_token_time is not None:
                req.ttft_reported = True
                self.metrics.ttft.observe(req.first_token_time - req.arrival_time)
            if u.finished:
                reason = req.finish_reason or "stop"
                self.metrics.requests_finished[reason] = self.metrics.requests_finished.get(reason, 0) + 1
                if n_out > 1 and req.first_token_time and req.finish_time:
                    self.metrics.tpot.observe((req.finish_time - req.first_token_time) / (n_out - 1))
            outs.append(StepOutput(req.request_id, u.new_token_ids, req.take_text_delta(), u.finished,
                                   req.finish_reason, req.num_prompt_tokens, n_out,
                                   max(req.num_cached_tokens, 0)))
        return outs

    # -- offline -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 progress: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion (continuous batching); outputs in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
        reqs: dict[str, int] = {}
        held: dict[str, Request] = {}
        for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
            rid = self.add_request(p, sp)
            reqs[rid] = i
            held[rid] = self.scheduler.requests[rid]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc="generate", unit="req")
        results: list[RequestOutput | None] = [None] * len(prompts)
        while self.has_unfinished():
            for o in self.step():
                if o.finished and o.request_id in reqs:
                    req = held.pop(o.request_id)
                    results[reqs[o.request_id]] = RequestOutput(
                        None, req.prompt_token_ids, req.text, req.output_token_ids,
                        req.finish_reason or "stop", _stats(req), {"cached_tokens": o.cached_tokens})
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    # -- gauges ------------------------------------------------------------------------------------
    def kv_usage(self) -> float:
        return self.scheduler.block_manager.usage

    def stats(self) -> dict[str, float | int]:
        bm = self.scheduler.block_manager
        return {
            "running": self.scheduler.num_running,
            "waiting": self.scheduler.num_waiting,
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_usage": bm.usage,
            "prefix_cache_hit_rate": bm.stats.hit_rate,
            "prefix_cache_queried_tokens": bm.stats.queried_tokens,
            "prefix_cache_hit_tokens": bm.stats.hit_tokens,
            "preemptions": self.scheduler.num_preemptions,
        }


class EngineDeadError(RuntimeError):
    pass


class AsyncLLMEngine:
    """Steps an ``LLMEngine`` in a background thread; requests stream through asyncio queues.

    Every engine call happens on that thread: handlers only post commands, so the scheduler and
    the model are never touched concurrently.
    """

    def __init__(self, engine: LLMEngine, max_waiting: int = 1024) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[StepOutput | Exception]]] = {}
        self._ids = itertools.count()
        self.error: BaseException | None = None
        self.num_pending = 0  # requests posted but not finished (admission control)
        self._thread = threading.Thread(target=self._loop, name="llmopt-engine", daemon=True)
        self._thread.start()

    # -- thread side -----------------------------------------------------------------------------
    def _post(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._commands.append(fn)
        self._wake.set()

    def _deliver(self, rid: str, item: StepOutput | Exception) -> None:
        entry = self._queues.get(rid)
        if entry is None:
            return
        loop, q = entry
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the handler's loop has closed
            self._queues.pop(rid, None)

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    cmds, self._commands = self._commands, []
                for fn in cmds:
                    fn()
                if self._stop and not cmds:
                    break
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
                    if out.finished and self._queues.pop(out.request_id, None) is not None:
                        self._dec_pending()
        except BaseException as e:  # a dead engine must fail every request, not hang them
            log.exception("engine loop died")
            self.error = e
            for rid in list(self._queues):
                self._deliver(rid, EngineDeadError(f"engine failed: {type(e).__name__}: {e}"))
            self._queues.clear()

    # -- handler side ------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None

    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                          request_id: str | None = None) -> RequestStream:
        """Queue a request; raises ``UserError`` (bad prompt) before returning its stream."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        rid = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[StepOutput | Exception] = asyncio.Queue()
        added: asyncio.Future[None] = loop.create_future()

        def add() -> None:
            try:
                self.engine.add_request(prompt_token_ids, params, rid)
            except Exception as e:
                loop.call_soon_threadsafe(_set_exc, added, e)
                return
            self._queues[rid] = (loop, q)
            loop.call_soon_threadsafe(_set_result, added)

        with self._lock:
            self.num_pending += 1
        try:
            self._post(add)
            await added
        except BaseException:
            self._dec_pending()
            raise
        return RequestStream(self, rid, q)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StepOutput]:
        """Yield outputs as the engine makes them; leaving early aborts the request."""
        stream = await self.add_request(prompt_token_ids, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def _dec_pending(self) -> None:
        with self._lock:
            self.num_pending -= 1

    def abort(self, request_id: str) -> None:
        def do() -> None:
            if self._queues.pop(request_id, None) is not None:
                self._dec_pending()
            self.engine.abort_request(request_id)

        self._post(do)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Let running requests finish for up to ``timeout`` seconds, then abort the rest."""
        deadline = time.perf_counter() + timeout
        while self.num_pending > 0 and self.is_running and time.perf_counter() < deadline:
            time.sleep(0.05)

        def abort_all() -> None:
            for rid in list(self._queues):
                self._deliver(rid, EngineDeadError("server shutting down"))
                self.engine.abort_request(rid)
            self._queues.clear()
            with self._lock:
                self.num_pending = 0

        self._post(abort_all)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=timeout)

    def call(self, fn: Callable[[LLMEngine], object], timeout: float = 5.0) -> object:
        """Run ``fn(engine)`` on the engine thread and return its result (for metrics)."""
        done = threading.Event()
        box: list[object] = []

        def run() -> None:
            box.append(fn(self.engine))
            done.set()

        self._post(run)
        if not done.wait(timeout):
            raise TimeoutError("engine thread busy")
        return box[0]


class RequestStream:
    """The outputs of one request, in order; ``abort()`` (idempotent) cancels it if unfinished."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str,
                 queue: asyncio.Queue[StepOutput | Exception]) -> None:
        self.engine = engine
        self.request_id = request_id
        self.queue = queue
        self.done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self.done:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, Exception):
            self.done = True
            raise item
        if item.finished:
            self.done = True
        return item

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.engine.abort(self.request_id)


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exc(fut: asyncio.Future[None], e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)
