"""The OpenAI-compatible HTTP app (FastAPI) over an ``AsyncLLMEngine``.

Every error leaves as an OpenAI error body with a 4xx/5xx status; a bad request is rejected
before it reaches the engine, so it never disturbs the others. A client that disconnects has its
request aborted, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmopt.engine.llm_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    LLMEngine,
    RequestStream,
    StepOutput,
)
from llmopt.errors import UserError
from llmopt.loading.tokenizer import Tokenizer
from llmopt.sampling import SamplingParams
from llmopt.server.metrics import render_metrics
from llmopt.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    Usage,
    error_body,
    new_id,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    max_pending_requests: int = 1024  # beyond this, 429
    max_prompt_tokens: int | None = None  # None: the context length minus one
    shutdown_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_pending_requests < 1:
            raise ValueError(f"max_pending_requests must be >= 1, got {self.max_pending_requests}")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def _sse(obj: Any) -> str:
    data = obj.model_dump_json(exclude_none=False) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


def build_app(engine: AsyncLLMEngine, tokenizer: Tokenizer | None, config: ServerConfig) -> FastAPI:
    core: LLMEngine = engine.engine
    max_model_len = core.max_model_len
    max_prompt = min(config.max_prompt_tokens or max_model_len - 1, max_model_len - 1)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has stopped accepting and waited for open responses; abort what is left.
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown, config.shutdown_timeout_s)

    app = FastAPI(title="llmopt", lifespan=lifespan)

    # -- errors -------------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return _error(400, f"request body is not valid JSON: {msg}")
        return _error(400, f"invalid value for {param or 'the request body'}: {msg}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(UserError)
    async def _user(_: Request, exc: UserError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return _error(503, str(exc), "server_error")

    # -- shared checks --------------------------------------------------------------------------
    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{config.model_name!r}", param="model", code="model_not_found")

    def sampling(req: CompletionRequest | ChatCompletionRequest, prompt_len: int,
                 max_tokens: int | None) -> SamplingParams:
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if req.presence_penalty != 0 or req.frequency_penalty != 0:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; "
                           "use repetition_penalty", param="presence_penalty")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if prompt_len > max_prompt:
            raise APIError(400, f"the prompt is {prompt_len} tokens; at most {max_prompt} are accepted",
                           param="prompt", code="context_length_exceeded")
        room = max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"this model's context is {max_model_len} tokens; the prompt "
                           f"({prompt_len}) plus max_tokens ({max_tokens}) exceeds it",
                           param="max_tokens", code="context_length_exceeded")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                              top_p=req.top_p, repetition_penalty=req.repetition_penalty,
                              seed=req.seed, stop=stop, ignore_eos=req.ignore_eos)

    def admit() -> None:
        if engine.num_pending >= config.max_pending_requests:
            raise APIError(429, f"too many requests in flight ({engine.num_pending}); retry later",
                           "rate_limit_exceeded", code="rate_limit_exceeded")
        if not engine.is_running:
            raise EngineDeadError("the engine is not running")

    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        return tokenizer.encode(text)

    async def collect(streams: list[RequestStream], raw: Request) -> list[list[StepOutput]]:
        """Drain every stream; abort them all if the client goes away first."""

        async def drain(s: RequestStream) -> list[StepOutput]:
            return [o async for o in s]

        task = asyncio.ensure_future(asyncio.gather(*(drain(s) for s in streams)))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await raw.is_disconnected():
                    task.cancel()
                    raise APIError(499, "client disconnected")
        finally:
            for s in streams:
                s.abort()

    def usage(prompt_tokens: int, outs: list[StepOutput]) -> Usage:
        last = outs[-1]
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=last.output_tokens,
                     total_tokens=prompt_tokens + last.output_tokens,
                     prompt_tokens_details={"cached_tokens": last.cached_tokens})

    # -- endpoints --------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return _error(503, "engine not running", "server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=config.model_name, max_model_len=max_model_len)])

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        def snapshot(e: LLMEngine) -> tuple[dict[str, float | int], Any]:
            import copy

            return e.stats(), copy.deepcopy(e.metrics)

        if engine.is_running:
            stats, m = await asyncio.get_running_loop().run_in_executor(None, engine.call, snapshot)  # type: ignore[misc]
        else:
            stats, m = core.stats(), core.metrics
        return PlainTextResponse(render_metrics(stats, m, config.model_name),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        check_model(req.model)
        if req.logprobs is not None:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", param="best_of")
        if req.echo or req.suffix:
            raise APIError(400, "echo and suffix are not supported", param="echo" if req.echo else "suffix")
        p = req.prompt
        if isinstance(p, str):
            prompts = [encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [encode(x) for x in p]  # type: ignore[arg-type]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]  # type: ignore[union-attr]
        else:
            raise APIError(400, "prompt must be a non-empty string, list of strings or token ids",
                           param="prompt")
        if any(not x for x in prompts):
            raise APIError(400, "empty prompt", param="prompt")
        if req.stream and len(prompts) > 1:
            raise APIError(400, "streaming takes one prompt at a time", param="prompt")
        params = [sampling(req, len(x), req.max_tokens) for x in prompts]
        admit()
        rid = new_id("cmpl")
        streams: list[RequestStream] = []
        try:
            for x, sp in zip(prompts, params, strict=True):
                streams.append(await engine.add_request(x, sp))
        except BaseException:
            for s in streams:
                s.abort()
            raise
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream_completion(streams[0], rid, req.model, len(prompts[0]),
                                                        include_usage),
                                     media_type="text/event-stream")
        results = await collect(streams, raw)
        choices = [CompletionChoice(index=i, text="".join(o.text_delta for o in outs),
                                    finish_reason=outs[-1].finish_reason)
                   for i, outs in enumerate(results)]
        us = [usage(len(x), outs) for x, outs in zip(prompts, results, strict=True)]
        total = Usage(prompt_tokens=sum(u.prompt_tokens for u in us),
                      completion_tokens=sum(u.completion_tokens for u in us),
                      total_tokens=sum(u.total_tokens for u in us))
        return JSONResponse(CompletionResponse(id=rid, model=req.model, choices=choices,
                                               usage=total).model_dump())

    async def _stream_completion(stream: RequestStream, rid: str, model: str, prompt_tokens: int,
                                 include_usage: bool) -> AsyncIterator[str]:
        last: StepOutput | None = None
        try:
            async for out in stream:
                last = out
                # A chunk per step with tokens, even before they make text, so clients can time them.
                if out.text_delta or out.new_token_ids or out.finished:
                    chunk = CompletionResponse(id=rid, model=model, choices=[CompletionChoice(
                        index=0, text=out.text_delta,
                        finish_reason=out.finish_reason if out.finished else None)])
                    yield _sse(chunk.model_dump(exclude={"usage"}))
            if include_usage and last is not None:
                yield _sse({"id": rid, "object": "text_completion", "model": model, "choices": [],
                            "usage": usage(prompt_tokens, [last]).model_dump()})
            yield "data: [DONE]\n\n"
        except EngineDeadError as e:
            yield _sse(error_body(str(e), "server_error"))
        finally:
            stream.abort()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatCompletionRequest, raw: Request) -> Response:
        check_model(req.model)
        if req.logprobs or req.top_logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if tokenizer is None or not tokenizer.chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "".join(part.text or "" for part in content)
            messages.append({"role": "system" if m.role == "developer" else m.role,
                             "content": content or ""})
        ids = tokenizer.encode_chat(messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling(req, len(ids), max_tokens)
        admit()
        rid = new_id("chatcmpl")
        stream = await engine.add_request(ids, params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream_chat(stream, rid, req.model, len(ids), include_usage),
                                     media_type="text/event-stream")
        outs = (await collect([stream], raw))[0]
        text = "".join(o.text_delta for o in outs)
        resp = ChatCompletionResponse(
            id=rid, model=req.model,
            choices=[ChatChoice(index=0, message=AssistantMessage(content=text),
                                finish_reason=outs[-1].finish_reason)],
            usage=usage(len(ids), outs))
        return JSONResponse(resp.model_dump())

    async def _stream_chat(stream: RequestStream, rid: str, model: str, prompt_tokens: int,
                           include_usage: bool) -> AsyncIterator[str]:
        last: StepOutput | None = None
        try:
            first = ChatCompletionChunk(id=rid, model=model, choices=[ChatChunkChoice(
                index=0, delta=DeltaMessage(role="assistant", content=""))])
            yield _sse(first.model_dump(exclude={"usage"}))
            async for out in stream:
                last = out
                if out.text_delta:
                    chunk = ChatCompletionChunk(id=rid, model=model, choices=[ChatChunkChoice(
                        index=0, delta=DeltaMessage(content=out.text_delta))])
                    yield _sse(chunk.model_dump(exclude={"usage"}))
                if out.finished:
                    chunk = ChatCompletionChunk(id=rid, model=model, choices=[ChatChunkChoice(
                        index=0, delta=DeltaMessage(), finish_reason=out.finish_reason)])
                    yield _sse(chunk.model_dump(exclude={"usage"}))
            if include_usage and last is not None:
                chunk = ChatCompletionChunk(id=rid, model=model, choices=[],
                                            usage=usage(prompt_tokens, [last]))
                yield _sse(chunk.model_dump())
            yield "data: [DONE]\n\n"
        except EngineDeadError as e:
            yield _sse(error_body(str(e), "server_error"))
        finally:
            stream.abort()

    return app
