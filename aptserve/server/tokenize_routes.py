"""/tokenize and /detokenize as vLLM serves them: the served model's tokenizer, and its chat template for messages."""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import Field

from aptserve.errors import InvalidRequestError
from aptserve.server.protocol import ChatMessage, ErrorResponse, OpenAIBaseModel
from aptserve.server.routes import render_chat, served_model

router = APIRouter()
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 500)}


class TokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    # One of the two: a text, or chat messages rendered with the model's chat template.
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
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
    tokens: list[int] = Field(max_length=1 << 20)


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
        text = render_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages],
                           body.add_generation_prompt)
        token_ids = engine.input_processor.tokenize(text, add_special_tokens=False)
    else:  # the engine's own checks: text that cannot fit the context or be tokenized is a 400
        token_ids = engine.input_processor.tokenize(body.prompt, add_special_tokens=body.add_special_tokens)
    token_strs = tokenizer.convert_ids_to_tokens(token_ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(token_ids), max_model_len=engine.config.model.max_model_len, tokens=token_ids,
                            token_strs=token_strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, raw_request: Request) -> DetokenizeResponse:
    served_model(raw_request, body.model)
    engine = raw_request.app.state.engine
    engine.input_processor.check_token_ids(body.tokens, "tokens")
    return DetokenizeResponse(prompt=_tokenizer(engine).decode(body.tokens))


def _tokenizer(engine):
    if engine.tokenizer is None:
        raise InvalidRequestError("this server has no tokenizer")
    return engine.tokenizer
