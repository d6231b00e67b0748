"""Server-sent events of completions and chat: one event per token of each choice, an error event if the engine
fails a request mid-stream, the usage last when asked for, then [DONE]."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from aptserve.errors import AptServeError
from aptserve.outputs import RequestOutput
from aptserve.server.choices import ChoiceStreams
from aptserve.server.errors import engine_error
from aptserve.server.logprobs_format import chat_logprobs, completion_logprobs, next_text_offset
from aptserve.server.protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatStreamChoice, CompletionChoice,
                                      CompletionRequest, CompletionResponse, DeltaMessage, ErrorResponse, UsageInfo)


def usage(outputs: list[RequestOutput]) -> UsageInfo:
    """The prompt once, the completion tokens of every choice."""
    first = outputs[0]
    return UsageInfo.of(len(first.prompt_token_ids), sum(o.num_output_tokens for o in outputs),
                        first.num_cached_tokens)


class EventStreamResponse(StreamingResponse):
    """SSE that aborts its requests however the response ends, even before its first byte."""

    def __init__(self, streams: ChoiceStreams, events: AsyncIterator[BaseModel]) -> None:
        super().__init__(_sse(events), media_type="text/event-stream")
        self._streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._streams.close()


async def _sse(events: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield f"data: {event.model_dump_json()}\n\n"
    except AptServeError as exc:  # the engine failed or cut this request mid-stream: tell the client, then end
        _, type, code = engine_error(exc)
        yield f"data: {ErrorResponse.of(str(exc), type, code=code).model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


def completion_choice(index: int, output: RequestOutput, body: CompletionRequest, tokenizer, first: bool,
                      text_offset: int = 0) -> tuple[CompletionChoice, int]:
    """A choice from a final output (or a stream's delta: `first` is its first one, `text_offset` where its text
    starts), and where the next delta's text starts. With echo, the first one starts with the prompt."""
    completion, logprobs = output.outputs[0], None
    echo = body.echo and first
    text = completion.text
    if echo:
        text = (output.prompt if output.prompt is not None else tokenizer.decode(output.prompt_token_ids)) + text
    if completion.logprobs is not None:
        logprobs = completion_logprobs(completion.logprobs, tokenizer, text_offset,
                                       output.prompt_token_ids if echo else None,
                                       output.prompt_logprobs if echo else None)
        text_offset = next_text_offset(logprobs, text_offset)
    choice = CompletionChoice(index=index, text=text, finish_reason=completion.finish_reason,
                              stop_reason=completion.stop_reason, logprobs=logprobs)
    return choice, text_offset


async def completion_events(streams: ChoiceStreams, body: CompletionRequest, request_id: str, model: str,
                            tokenizer) -> AsyncIterator[CompletionResponse]:
    created, last, text_offsets = int(time.time()), {}, {}
    async for index, output in streams:  # one delta, and one event, per token
        choice, text_offsets[index] = completion_choice(index, output, body, tokenizer, index not in last,
                                                        text_offsets.get(index, 0))
        last[index] = output
        yield CompletionResponse(id=request_id, created=created, model=model, choices=[choice])
    if body.include_usage:
        yield CompletionResponse(id=request_id, created=created, model=model, choices=[],
                                 usage=usage([last[i] for i in sorted(last)]))


async def chat_events(streams: ChoiceStreams, body: ChatCompletionRequest, request_id: str, model: str,
                      tokenizer) -> AsyncIterator[ChatCompletionChunk]:
    # The role rides on each choice's first token's event, so events == tokens and TTFT is the first event.
    created, last = int(time.time()), {}
    async for index, output in streams:
        role = "assistant" if index not in last else None
        last[index], completion = output, output.outputs[0]
        logprobs = None if completion.logprobs is None else chat_logprobs(completion.logprobs, tokenizer)
        choice = ChatStreamChoice(index=index, delta=DeltaMessage(role=role, content=completion.text),
                                  logprobs=logprobs, finish_reason=completion.finish_reason,
                                  stop_reason=completion.stop_reason)
        yield ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])
    if body.include_usage:
        yield ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                  usage=usage([last[i] for i in sorted(last)]))
