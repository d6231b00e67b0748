"""The OpenAI-compatible HTTP API: FastAPI routes over AsyncLLMEngine, OpenAI errors, health, metrics.

Every refusal is an OpenAI error body `{"error": {"message", "type", "param", "code"}}`: 400 for what the
client must change (never FastAPI's 422), 503 when the queue is full or the server drains, 500 only when
the engine fails a request.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import jinja2
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from aptserve.config import EngineConfig
from aptserve.engine import LLMEngine
from aptserve.errors import AptServeError, EngineOverloadedError, InvalidRequestError
from aptserve.outputs import RequestOutput
from aptserve.server.async_engine import (AsyncLLMEngine, RequestFailedError, RequestStream,
                                          ServerDrainingError)
from aptserve.server.protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk,
                                      ChatCompletionRequest, ChatCompletionResponse, ChatStreamChoice,
                                      CompletionChoice, CompletionRequest, CompletionResponse, DeltaMessage,
                                      ErrorResponse, ModelCard, ModelList, SamplingRequest, UsageInfo)

logger = logging.getLogger(__name__)
router = APIRouter()
_ERRORS = {400: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


@dataclass(frozen=True)
class ServerConfig:
    # Names a request's `model` may use; the first is the one reported. Empty: the engine's model name.
    served_model_names: tuple[str, ...] = ()
    max_queue_len: int = 1024


class APIError(Exception):
    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message = status_code, message
        self.type, self.param, self.code = type, param, code


def create_app(engine: LLMEngine | EngineConfig,
               server_config: ServerConfig = ServerConfig()) -> FastAPI:
    """The app over an engine already built (tests) or one built here from its config."""
    if isinstance(engine, EngineConfig):
        engine = LLMEngine.from_config(engine)
    app = FastAPI(title="aptserve", description="OpenAI-compatible LLM serving", lifespan=_lifespan)
    app.state.engine = AsyncLLMEngine(engine, server_config.max_queue_len)
    names = server_config.served_model_names or (engine.model_config.served_name,)
    app.state.model_names = tuple(dict.fromkeys((*names, engine.config.model)))
    app.include_router(router)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(AptServeError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.engine.start()
    try:
        yield
    finally:
        await asyncio.to_thread(app.state.engine.shutdown)


# --- routes --------------------------------------------------------------------------------------
@router.get("/health")
async def health(raw_request: Request) -> Response:
    engine: AsyncLLMEngine = raw_request.app.state.engine
    if engine.draining:
        return error_response(503, "the server is shutting down", "server_error",
                              code="server_shutting_down")
    if not engine.is_running:
        return error_response(503, "the engine loop is not running", "server_error", code="engine_dead")
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(raw_request: Request) -> Response:
    content, content_type = raw_request.app.state.engine.metrics.render()
    return Response(content, media_type=content_type)


@router.get("/v1/models", response_model=ModelList)
async def list_models(raw_request: Request) -> ModelList:
    max_model_len = raw_request.app.state.engine.engine.model_config.max_model_len
    return ModelList(data=[ModelCard(id=raw_request.app.state.model_names[0], max_model_len=max_model_len)])


@router.post("/v1/completions", response_model=None,
             responses={200: {"model": CompletionResponse}, **_ERRORS})
async def create_completion(body: CompletionRequest,
                            raw_request: Request) -> Response | CompletionResponse:
    model = _served_model(raw_request, body.model)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    stream = await _add_request(raw_request, request_id, body.prompt_input(), body)
    if body.stream:
        return _EventStreamResponse(stream, _completion_events(stream, body, request_id, model))
    output = await _final_output(raw_request, stream)
    if output is None:
        return Response(status_code=499)  # client closed the request; nobody reads this
    completion = output.outputs[0]
    choice = CompletionChoice(text=completion.text, finish_reason=completion.finish_reason,
                              stop_reason=completion.stop_reason)
    return CompletionResponse(id=request_id, model=model, choices=[choice], usage=_usage(output))


@router.post("/v1/chat/completions", response_model=None,
             responses={200: {"model": ChatCompletionResponse}, **_ERRORS})
async def create_chat_completion(body: ChatCompletionRequest,
                                 raw_request: Request) -> Response | ChatCompletionResponse:
    model = _served_model(raw_request, body.model)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    stream = await _add_request(raw_request, request_id, _chat_prompt(raw_request, body), body)
    if body.stream:
        return _EventStreamResponse(stream, _chat_events(stream, body, request_id, model))
    output = await _final_output(raw_request, stream)
    if output is None:
        return Response(status_code=499)
    completion = output.outputs[0]
    choice = ChatChoice(message=AssistantMessage(content=completion.text),
                        finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)
    return ChatCompletionResponse(id=request_id, model=model, choices=[choice], usage=_usage(output))


# --- request helpers -----------------------------------------------------------------------------
def _served_model(raw_request: Request, name: str) -> str:
    names = raw_request.app.state.model_names
    if name not in names:
        raise APIError(400, f"the model {name!r} does not exist; this server serves {names[0]!r}",
                       param="model", code="model_not_found")
    return names[0]


async def _add_request(raw_request: Request, request_id: str, prompt: str | list[int],
                       body: SamplingRequest) -> RequestStream:
    engine: AsyncLLMEngine = raw_request.app.state.engine
    max_model_len = engine.engine.model_config.max_model_len

    def make_params(num_prompt_tokens: int):  # no max_tokens: fill the context, as OpenAI does
        return body.to_sampling_params(default_max_tokens=max(1, max_model_len - num_prompt_tokens))

    return await engine.add_request(request_id, prompt, make_params, body.ttft_slo, body.tbt_slo)


def _chat_prompt(raw_request: Request, body: ChatCompletionRequest) -> str:
    tokenizer = raw_request.app.state.engine.engine.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("this model has no chat template; use /v1/completions")
    try:
        return tokenizer.apply_chat_template(body.conversation(), tokenize=False,
                                             add_generation_prompt=True)
    except jinja2.TemplateError as exc:
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from exc


async def _final_output(raw_request: Request, stream: RequestStream) -> RequestOutput | None:
    """The last output of a non-streaming request; None (request aborted) if the client leaves first."""
    collect = asyncio.ensure_future(_last_output(stream))
    disconnect = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait((collect, disconnect), return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        collect.cancel()
        stream.close()
    return collect.result() if collect.done() and not collect.cancelled() else None


async def _last_output(stream: RequestStream) -> RequestOutput:
    last = None
    async for output in stream:
        last = output
    return last


async def _wait_for_disconnect(raw_request: Request) -> None:
    while (await raw_request.receive())["type"] != "http.disconnect":
        pass


def _usage(output: RequestOutput) -> UsageInfo:
    return UsageInfo.of(len(output.prompt_token_ids), len(output.outputs[0].token_ids))


# --- streaming (SSE) -----------------------------------------------------------------------------
class _EventStreamResponse(StreamingResponse):
    """SSE that aborts its request however the response ends, even before its first byte."""

    def __init__(self, stream: RequestStream, events: AsyncIterator[BaseModel]) -> None:
        super().__init__(_sse(events), media_type="text/event-stream")
        self._request_stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._request_stream.close()


async def _sse(events: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield f"data: {event.model_dump_json()}\n\n"
    except AptServeError as exc:  # the engine failed this request mid-stream: tell the client, then end
        error = ErrorResponse.of(str(exc), "server_error", code="request_failed")
        yield f"data: {error.model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


async def _completion_events(stream: RequestStream, body: CompletionRequest, request_id: str,
                             model: str) -> AsyncIterator[CompletionResponse]:
    created, output = int(time.time()), None
    async for text, output in stream.text_deltas():  # one event per token
        completion = output.outputs[0]
        choice = CompletionChoice(text=text, finish_reason=completion.finish_reason,
                                  stop_reason=completion.stop_reason)
        yield CompletionResponse(id=request_id, created=created, model=model, choices=[choice])
    if body.include_usage:
        yield CompletionResponse(id=request_id, created=created, model=model, choices=[],
                                 usage=_usage(output))


async def _chat_events(stream: RequestStream, body: ChatCompletionRequest, request_id: str,
                       model: str) -> AsyncIterator[ChatCompletionChunk]:
    # The role rides on the first token's event, so events == tokens and TTFT is the first event.
    created, output, role = int(time.time()), None, "assistant"
    async for text, output in stream.text_deltas():
        completion = output.outputs[0]
        delta, role = DeltaMessage(role=role, content=text), None
        choice = ChatStreamChoice(delta=delta, finish_reason=completion.finish_reason,
                                  stop_reason=completion.stop_reason)
        yield ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])
    if body.include_usage:
        yield ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                  usage=_usage(output))


# --- errors --------------------------------------------------------------------------------------
def error_response(status_code: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse.of(message, type, param, code).model_dump()
    return JSONResponse(body, status_code=status_code, headers=headers)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status_code, exc.message, exc.type, exc.param, exc.code)


async def _engine_error(raw_request: Request, exc: AptServeError) -> JSONResponse:
    if isinstance(exc, InvalidRequestError):
        return error_response(400, str(exc))
    if isinstance(exc, EngineOverloadedError):
        code = "server_shutting_down" if isinstance(exc, ServerDrainingError) else "server_overloaded"
        raw_request.app.state.engine.metrics.requests_rejected.labels(code).inc()
        return error_response(503, str(exc), "server_error", code=code, headers={"Retry-After": "1"})
    code = "request_failed" if isinstance(exc, RequestFailedError) else None
    return error_response(500, str(exc), "server_error", code=code)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI would answer 422; OpenAI clients expect 400 naming the offending field."""
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", "")
        return error_response(400, f"the request body is not valid JSON: {detail}")
    messages = []
    for error in errors[:3]:
        loc = ".".join(str(part) for part in error["loc"][1:]) or "request body"
        messages.append(f"{loc}: {error['msg']}")
    param = str(errors[0]["loc"][1]) if errors and len(errors[0]["loc"]) > 1 else None
    return error_response(400, "; ".join(messages) or "invalid request", param=param)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(exc.status_code, str(exc.detail), type, headers=exc.headers)


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error")


# --- running under uvicorn -----------------------------------------------------------------------
class DrainingServer(uvicorn.Server):
    """uvicorn that drains on SIGTERM/SIGINT: new requests get 503 while running ones finish, up to
    `shutdown_timeout_s`; then it exits (status 0). A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.shutdown_timeout_s = shutdown_timeout_s
        self._drain_deadline: float | None = None

    @property
    def engine(self) -> AsyncLLMEngine:
        return self.config.app.state.engine

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:  # unlike uvicorn's, do not re-raise the signal: a drained server exits cleanly
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain_deadline is not None:
            self.should_exit = self.force_exit = True
            return
        logger.info("draining: refusing new requests, finishing %d (up to %.0f s)",
                    self.engine.num_unfinished, self.shutdown_timeout_s)
        self.engine.draining = True
        self._drain_deadline = time.monotonic() + self.shutdown_timeout_s

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None and (
                self.engine.num_unfinished == 0 or time.monotonic() >= self._drain_deadline):
            self.should_exit = True
        return await super().on_tick(counter)


def build_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
                 shutdown_timeout_s: float = 30.0, access_log: bool = True,
                 log_level: str = "info") -> DrainingServer:
    """A uvicorn server for the app; `.run()` serves until a signal (or `.handle_exit`) drains it."""
    # The drain already waited for requests; uvicorn's own grace is only for their last bytes.
    config = uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level=log_level,
                            timeout_graceful_shutdown=1)
    return DrainingServer(config, shutdown_timeout_s)
