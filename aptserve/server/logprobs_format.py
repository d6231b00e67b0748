"""Log probabilities in OpenAI's two shapes: the legacy completions lists and chat's per-token objects.

A token is shown as its text decoded alone (as vLLM does), so a token that is part of a multi-byte character shows
U+FFFD; chat's `bytes` are that text's UTF-8 bytes.
"""
from __future__ import annotations

import functools
import math

from aptserve.logprobs import TokenLogprobs
from aptserve.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def token_text(tokenizer, token_id: int) -> str:
    return _decode_one(tokenizer, token_id) if tokenizer is not None else str(token_id)


# Formatting runs on the event loop, and an echoed prompt with 20 alternatives per token asks for ~20,000 texts; a
# tokenizer call costs microseconds each, a lookup here much less. Bounded: at most a vocabulary's worth.
@functools.lru_cache(maxsize=1 << 18)
def _decode_one(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _finite(logprob: float) -> float:
    """JSON has no -inf: a token with zero probability is reported at the lowest float, as vLLM does."""
    return logprob if math.isfinite(logprob) else -9999.0


def completion_logprobs(logprobs: list[TokenLogprobs], tokenizer, text_offset: int = 0,
                        prompt_token_ids: list[int] | None = None,
                        prompt_logprobs: list[TokenLogprobs] | None = None) -> CompletionLogprobs:
    """`text_offset`: where the first token's text starts in the choice's text (a stream continues it). With the
    prompt's (echo), its tokens come first, the first one without a log probability (nothing precedes it). Each
    position's top entries hold its own token too, as OpenAI's do: up to logprobs + 1 of them."""
    result = CompletionLogprobs()
    if prompt_token_ids:
        result.tokens.append(token_text(tokenizer, prompt_token_ids[0]))
        result.token_logprobs.append(None)
        result.top_logprobs.append(None)
        result.text_offset.append(text_offset)
        text_offset += len(result.tokens[0])
    for position in [*(prompt_logprobs or []), *logprobs]:
        text = token_text(tokenizer, position.token_id)
        result.tokens.append(text)
        result.token_logprobs.append(_finite(position.logprob))
        result.text_offset.append(text_offset)
        text_offset += len(text)
        top = {token_text(tokenizer, t): _finite(lp) for t, lp in zip(position.top_token_ids, position.top_logprobs)}
        top.setdefault(text, _finite(position.logprob))
        result.top_logprobs.append(top)
    return result


def next_text_offset(logprobs: CompletionLogprobs | None, text_offset: int) -> int:
    """Where the token after `logprobs`' last one starts."""
    if logprobs is None or not logprobs.tokens:
        return text_offset
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1])


def chat_logprobs(logprobs: list[TokenLogprobs], tokenizer) -> ChatLogprobs:
    content = []
    for position in logprobs:
        text = token_text(tokenizer, position.token_id)
        top = [_top(token_text(tokenizer, t), lp) for t, lp in zip(position.top_token_ids, position.top_logprobs)]
        content.append(ChatTokenLogprob(token=text, logprob=_finite(position.logprob),
                                        bytes=list(text.encode("utf-8", errors="replace")), top_logprobs=top))
    return ChatLogprobs(content=content)


def _top(text: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode("utf-8", errors="replace")))
