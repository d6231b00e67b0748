"""The OpenAI-compatible routes: completions and chat (JSON, or SSE from streaming.py), models, health, metrics.
Handlers never touch the engine; they talk to AsyncLLM (or the cluster's engine, which has its surface)."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel

from aptserve.errors import EngineOverloadedError
from aptserve.outputs import RequestOutput
from aptserve.server.async_llm import AsyncLLM
from aptserve.server.chat_template import render_chat
from aptserve.server.choices import ChoiceStreams
from aptserve.server.errors import APIError, error_response
from aptserve.server.logprobs_format import chat_logprobs
from aptserve.server.protocol import (AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                                      CompletionRequest, CompletionResponse, ErrorResponse,
                                      ModelCard, ModelList, SamplingRequest)
from aptserve.server.streaming import EventStreamResponse, chat_events, completion_choice, completion_events, usage

router = APIRouter()
DISCONNECT_GRACE_S = 0.005
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
    tokenizer = raw_request.app.state.engine.tokenizer

    def respond(outputs: list[RequestOutput], request_id: str, model: str) -> CompletionResponse:
        choices = [completion_choice(index, output, body, tokenizer, first=True)[0]
                   for index, output in enumerate(outputs)]
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage(outputs))

    async def prompt() -> str | list[int]:
        return body.prompt_input()

    return await _serve(raw_request, body, "cmpl", prompt, completion_events, respond)


@router.post("/v1/chat/completions", response_model=None,
             responses={200: {"model": ChatCompletionResponse, "content": _STREAM}, **_ERRORS})
async def create_chat_completion(body: ChatCompletionRequest,
                                 raw_request: Request) -> Response | ChatCompletionResponse:
    tokenizer = raw_request.app.state.engine.tokenizer

    def respond(outputs: list[RequestOutput], request_id: str, model: str) -> ChatCompletionResponse:
        choices = []
        for index, output in enumerate(outputs):
            completion = output.outputs[0]
            logprobs = None if completion.logprobs is None else chat_logprobs(completion.logprobs, tokenizer)
            choices.append(ChatChoice(index=index, message=AssistantMessage(content=completion.text),
                                      logprobs=logprobs, finish_reason=completion.finish_reason,
                                      stop_reason=completion.stop_reason))
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage(outputs))

    engine = raw_request.app.state.engine
    return await _serve(raw_request, body, "chatcmpl", lambda: render_chat(engine, body.conversation()),
                        chat_events, respond)


async def _serve(raw_request: Request, body: SamplingRequest, id_prefix: str,
                 prompt: Callable[[], Awaitable[str | list[int]]], events: Callable,
                 respond: Callable) -> Response | BaseModel:
    """Queue the request's n choices, then stream their events or answer once with `respond(final outputs, id,
    model)`."""
    model = served_model(raw_request, body.model)
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    engine: AsyncLLM = raw_request.app.state.engine
    try:  # before any work: a request that cannot be queued costs nothing
        engine.check_capacity(body.n)
    except EngineOverloadedError:
        # A client that gave up on a request and sent its next one at once: the first one's disconnect may be
        # received but not yet processed (its abort is a few loop turns away); let it land before refusing.
        await asyncio.sleep(DISCONNECT_GRACE_S)
        engine.check_capacity(body.n)
    text_or_ids, params = await prompt(), body.to_sampling_params()

    def add_one(child_id: str, child_params):
        return engine.add_request(child_id, text_or_ids, child_params, body.ttft_slo, body.tbt_slo)

    streams = await ChoiceStreams.add(add_one, request_id, params, body.n)
    if body.stream:
        return EventStreamResponse(streams, events(streams, body, request_id, model, engine.tokenizer))
    outputs = await _final_outputs(raw_request, streams)
    if outputs is None:
        return Response(status_code=499)  # client closed the request; nobody reads this
    return respond(outputs, request_id, model)


# --- request helpers -----------------------------------------------------------------------------
def served_model(raw_request: Request, name: str | None) -> str:
    names = raw_request.app.state.model_names
    if name and name not in names:
        raise APIError(400, f"the model {name!r} does not exist; this server serves {names[0]!r}",
                       param="model", code="model_not_found")
    return names[0]


async def _final_outputs(raw_request: Request, streams: ChoiceStreams) -> list[RequestOutput] | None:
    """The last output of every choice of a non-streaming request; None (aborted) if the client leaves first."""
    collect = asyncio.ensure_future(streams.final_outputs())
    disconnect = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait((collect, disconnect), return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        collect.cancel()
        streams.close()
    return collect.result() if collect.done() and not collect.cancelled() else None


async def _wait_for_disconnect(raw_request: Request) -> None:
    while (await raw_request.receive())["type"] != "http.disconnect":
        pass
