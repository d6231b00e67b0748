"""The OpenAI-compatible routes: completions and chat (JSON or SSE, one event per token), models, health,
metrics. Handlers never touch the engine; they talk to AsyncLLM."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Literal

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel

from aptserve.errors import AptServeError, InvalidRequestError
from aptserve.outputs import RequestOutput
from aptserve.server.async_llm import AsyncLLM, RequestStream
from aptserve.server.errors import APIError, engine_error, error_response
from aptserve.server.protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                      ChatCompletionResponse, ChatStreamChoice, CompletionChoice,
                                      CompletionRequest, CompletionResponse, DeltaMessage, ErrorResponse,
                                      ModelCard, ModelList, SamplingRequest, UsageInfo)

router = APIRouter()
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 500, 503)}
# Completions answer JSON, or with "stream": true server-sent events (one JSON object per `data:` line).
_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}


class HealthStatus(BaseModel):
    status: Literal["ok"] = "ok"


@router.get("/health", response_model=HealthStatus, responses={503: {"model": ErrorResponse}})
async def health(raw_request: Request) -> HealthStatus | Response:
    engine: AsyncLLM = raw_request.app.state.engine
    if engine.draining:
        return error_response(503, "the server is shutting down", "server_error",
                              code="server_shutting_down")
    if not engine.is_running:
        return error_response(503, "the engine loop is not running", "server_error", code="engine_dead")
    return HealthStatus()


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(raw_request: Request) -> Response:
    content, content_type = raw_request.app.state.engine.metrics.render()
    return Response(content, media_type=content_type)


@router.get("/v1/models", response_model=ModelList)
async def list_models(raw_request: Request) -> ModelList:
    max_model_len = raw_request.app.state.engine.config.model.max_model_len
    return ModelList(data=[ModelCard(id=raw_request.app.state.model_names[0], max_model_len=max_model_len)])


@router.post("/v1/completions", response_model=None,
             responses={200: {"model": CompletionResponse, "content": _STREAM}, **_ERRORS})
async def create_completion(body: CompletionRequest,
                            raw_request: Request) -> Response | CompletionResponse:
    def respond(output: RequestOutput, request_id: str, model: str) -> CompletionResponse:
        completion = output.outputs[0]
        choice = CompletionChoice(text=completion.text, finish_reason=completion.finish_reason,
                                  stop_reason=completion.stop_reason)
        return CompletionResponse(id=request_id, model=model, choices=[choice], usage=_usage(output))

    return await _serve(raw_request, body, "cmpl", body.prompt_input, _completion_events, respond)


@router.post("/v1/chat/completions", response_model=None,
             responses={200: {"model": ChatCompletionResponse, "content": _STREAM}, **_ERRORS})
async def create_chat_completion(body: ChatCompletionRequest,
                                 raw_request: Request) -> Response | ChatCompletionResponse:
    def respond(output: RequestOutput, request_id: str, model: str) -> ChatCompletionResponse:
        completion = output.outputs[0]
        choice = ChatChoice(message=AssistantMessage(content=completion.text),
                            finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)
        return ChatCompletionResponse(id=request_id, model=model, choices=[choice], usage=_usage(output))

    return await _serve(raw_request, body, "chatcmpl", lambda: _chat_prompt(raw_request, body), _chat_events,
                        respond)


async def _serve(raw_request: Request, body: SamplingRequest, id_prefix: str, prompt: Callable[[], str | list[int]],
                 events: Callable, respond: Callable) -> Response | BaseModel:
    """Queue the request, then stream its events or answer once with `respond(final output, id, model)`."""
    model = _served_model(raw_request, body.model)
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    stream = await _add_request(raw_request, request_id, prompt(), body)
    if body.stream:
        return _EventStreamResponse(stream, events(stream, body, request_id, model))
    output = await _final_output(raw_request, stream)
    if output is None:
        return Response(status_code=499)  # client closed the request; nobody reads this
    return respond(output, request_id, model)


# --- request helpers -----------------------------------------------------------------------------
def _served_model(raw_request: Request, name: str | None) -> str:
    names = raw_request.app.state.model_names
    if name and name not in names:
        raise APIError(400, f"the model {name!r} does not exist; this server serves {names[0]!r}",
                       param="model", code="model_not_found")
    return names[0]


async def _add_request(raw_request: Request, request_id: str, prompt: str | list[int],
                       body: SamplingRequest) -> RequestStream:
    engine: AsyncLLM = raw_request.app.state.engine
    return await engine.add_request(request_id, prompt, body.to_sampling_params(), body.ttft_slo, body.tbt_slo)


def _chat_prompt(raw_request: Request, body: ChatCompletionRequest) -> str:
    tokenizer = raw_request.app.state.engine.tokenizer
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
    return UsageInfo.of(len(output.prompt_token_ids), output.num_output_tokens, output.num_cached_tokens)


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
    except AptServeError as exc:  # the engine failed or cut this request mid-stream: tell the client, then end
        _, type, code = engine_error(exc)
        yield f"data: {ErrorResponse.of(str(exc), type, code=code).model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


async def _completion_events(stream: RequestStream, body: CompletionRequest, request_id: str,
                             model: str) -> AsyncIterator[CompletionResponse]:
    created, output = int(time.time()), None
    async for output in stream:  # one delta, and one event, per token
        completion = output.outputs[0]
        choice = CompletionChoice(text=completion.text, finish_reason=completion.finish_reason,
                                  stop_reason=completion.stop_reason)
        yield CompletionResponse(id=request_id, created=created, model=model, choices=[choice])
    if body.include_usage:
        yield CompletionResponse(id=request_id, created=created, model=model, choices=[],
                                 usage=_usage(output))


async def _chat_events(stream: RequestStream, body: ChatCompletionRequest, request_id: str,
                       model: str) -> AsyncIterator[ChatCompletionChunk]:
    # The role rides on the first token's event, so events == tokens and TTFT is the first event.
    created, output, role = int(time.time()), None, "assistant"
    async for output in stream:
        completion = output.outputs[0]
        delta, role = DeltaMessage(role=role, content=completion.text), None
        choice = ChatStreamChoice(delta=delta, finish_reason=completion.finish_reason,
                                  stop_reason=completion.stop_reason)
        yield ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])
    if body.include_usage:
        yield ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                  usage=_usage(output))
