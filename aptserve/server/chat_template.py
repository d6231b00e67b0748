"""A chat request's prompt: its messages as the model's chat template renders them.

Rendering is Python (Jinja) work that grows with the messages, so it is bounded before it starts (the schema caps
how many messages and parts a request has, protocol.MAX_CHAT_ITEMS; here, their characters against what the
context can hold) and runs in a worker thread, never on the event loop that feeds every other stream.
"""
from __future__ import annotations

import asyncio

import jinja2

from aptserve.errors import InvalidRequestError
from aptserve.server.errors import APIError


async def render_chat(engine, conversation: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The text of a chat request's prompt; InvalidRequestError/APIError (400) for messages that cannot fit the
    context or that the template rejects."""
    tokenizer = engine.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("this model has no chat template; use /v1/completions")
    # The rendered prompt holds every message's text, so text the context cannot hold is refused unrendered.
    engine.input_processor.check_prompt_chars(sum(len(message["content"]) for message in conversation),
                                              "the messages' text")
    return await asyncio.to_thread(_render, tokenizer, conversation, add_generation_prompt)


def _render(tokenizer, conversation: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as exc:
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from exc
