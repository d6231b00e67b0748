"""/tokenize and /detokenize as vLLM serves them: the served model's tokenizer, and its chat template for messages."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from aptserve.errors import InvalidRequestError
from aptserve.server.async_llm import INLINE_TOKENIZE_CHARS
from aptserve.server.chat_template import render_chat
from aptserve.server.protocol import ChatMessages, ErrorResponse, OpenAIBaseModel
from aptserve.server.routes import served_model

router = APIRouter()
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 500)}


class TokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    # One of the two: a text, or chat messages rendered with the model's chat template.
    prompt: str | None = None
    messages: ChatMessages | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True  # messages only
    return_token_strs: bool = False


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]  # at most a context's worth (the route checks it against the model)


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeRequest, raw_request: Request) -> TokenizeResponse:
    served_model(raw_request, body.model)
    engine = raw_request.app.state.engine
    tokenizer = _tokenizer(engine)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("send either a prompt or messages")
    if body.messages is not None:  # the chat template writes the special tokens itself
        text = await render_chat(engine, [{"role": m.role, "content": m.text()} for m in body.messages],
                                 body.add_generation_prompt)
        add_special_tokens = False
    else:
        text, add_special_tokens = body.prompt, body.add_special_tokens

    def tokenize() -> tuple[list[int], list[str] | None]:
        # The engine's own checks: text that cannot fit the context or be tokenized is a 400.
        token_ids = engine.input_processor.tokenize(text, add_special_tokens=add_special_tokens)
        return token_ids, tokenizer.convert_ids_to_tokens(token_ids) if body.return_token_strs else None

    # As the engine's door does: a long text is tokenized off the event loop (the tokenizer releases the GIL).
    token_ids, token_strs = await asyncio.to_thread(tokenize) if len(text) > INLINE_TOKENIZE_CHARS else tokenize()
    return TokenizeResponse(count=len(token_ids), max_model_len=engine.config.model.max_model_len, tokens=token_ids,
                            token_strs=token_strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, raw_request: Request) -> DetokenizeResponse:
    served_model(raw_request, body.model)
    engine = raw_request.app.state.engine
    engine.input_processor.check_context_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=_tokenizer(engine).decode(body.tokens))


def _tokenizer(engine):
    if engine.tokenizer is None:
        raise InvalidRequestError("this server has no tokenizer")
    return engine.tokenizer
