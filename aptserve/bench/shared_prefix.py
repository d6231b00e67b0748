"""Traces whose prompts share prefixes, for prefix caching: multi-turn ShareGPT conversations replayed turn by turn,
and N system prompts x M users."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from aptserve.bench.datasets import (SHAREGPT_FILE, SYNTHETIC_WORDS, TraceRequest, _exact_length_text, encode,
                                     iter_json_array, package_data_path)


def read_sharegpt_conversations(path: str | None = None, min_turns: int = 2) -> list[list[tuple[str, str]]]:
    """The (human, gpt) turns of every conversation that opens with a human turn and has at least `min_turns`
    exchanges."""
    path = path or package_data_path(*SHAREGPT_FILE)
    conversations = []
    with open(path, encoding="utf-8") as file:
        for conversation in iter_json_array(file):
            turns = conversation.get("conversations", [])
            pairs = []
            for human, gpt in zip(turns[::2], turns[1::2]):
                if human.get("from") != "human" or gpt.get("from") != "gpt":
                    break
                pairs.append((human["value"], gpt["value"]))
            if len(pairs) >= min_turns:
                conversations.append(pairs)
    return conversations


def sample_sharegpt_multiturn(tokenizer: Any, num_requests: int, rng: np.random.Generator,
                              max_prompt_len: int | None = 2048, max_output_len: int | None = None,
                              num_active: int = 8) -> list[TraceRequest]:
    """Multi-turn ShareGPT conversations replayed turn by turn: turn k's prompt is the whole conversation so far
    (every earlier question and the dataset's reply to it, as "User: ... / Assistant: ..." text) and its output the
    dataset's k-th reply, so each prompt extends the previous turn's. `num_active` conversations run at once, their
    turns interleaved in order (a turn arrives a few requests after the one it extends); a conversation ends at its
    last turn or when its history passes `max_prompt_len`."""
    conversations = read_sharegpt_conversations()
    trace: list[TraceRequest] = []
    active: list[Iterator[TraceRequest]] = []
    order = iter(rng.permutation(len(conversations)))
    while len(trace) < num_requests:
        while len(active) < num_active:
            index = next(order, None)
            if index is None:
                break
            active.append(_conversation_turns(tokenizer, conversations[index], max_prompt_len, max_output_len))
        if not active:
            raise ValueError(f"the ShareGPT conversations give only {len(trace)} turns; asked for {num_requests}")
        for turns in list(active):
            turn = next(turns, None)
            if turn is None:
                active.remove(turns)
            elif len(trace) < num_requests:
                trace.append(turn)
    return trace


def _conversation_turns(tokenizer: Any, pairs: list[tuple[str, str]], max_prompt_len: int | None,
                        max_output_len: int | None) -> Iterator[TraceRequest]:
    history = ""
    for human, gpt in pairs:
        prompt = f"{history}User: {human}\nAssistant:"
        prompt_ids, output_len = encode(tokenizer, prompt), len(encode(tokenizer, gpt))
        if max_prompt_len is not None and len(prompt_ids) > max_prompt_len:
            return
        if output_len >= 4:  # the DistServe / vLLM filter's minimum
            yield TraceRequest(prompt, len(prompt_ids), min(output_len, max_output_len or output_len),
                               tuple(prompt_ids))
        history = f"{prompt} {gpt}\n"


def sample_shared_prefix(tokenizer: Any, num_requests: int, rng: np.random.Generator, num_prefixes: int = 4,
                         prefix_len: int = 512, prompt_len: int = 64, output_len: int = 128) -> list[TraceRequest]:
    """N system prompts x M users: each request is one of `num_prefixes` system prompts of `prefix_len` tokens
    (round robin) followed by a question of its own of about `prompt_len` tokens (random common words)."""
    if min(num_prefixes, prefix_len, prompt_len, output_len) < 1:
        raise ValueError("num_prefixes, prefix_len, prompt_len and output_len must be >= 1")
    words = [w for w in SYNTHETIC_WORDS if len(encode(tokenizer, " " + w)) == 1] or list(SYNTHETIC_WORDS)
    prefixes = [_exact_length_text(tokenizer, words, prefix_len, rng) for _ in range(num_prefixes)]
    trace = []
    for index in range(num_requests):
        prefix_text, _ = prefixes[index % num_prefixes]
        question_text, _ = _exact_length_text(tokenizer, words, prompt_len, rng)
        text = f"{prefix_text} {question_text}"
        token_ids = encode(tokenizer, text)  # the prefix's ids come first: it starts the text
        trace.append(TraceRequest(text, len(token_ids), output_len, tuple(token_ids)))
    return trace
