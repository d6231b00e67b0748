"""The figures step_speed.py takes, in a module that imports nothing but the standard library, so that its vLLM
worker (another venv, without aptserve) times vLLM exactly as aptserve is timed."""
from __future__ import annotations


def prompts_for(num_requests: int, prompt_len: int, salt: int) -> list[list[int]]:
    """Distinct token-id prompts (a salt per call, so no prefix cache ever serves one)."""
    return [[(7919 * salt + 104729 * i + 31 * j) % 40000 + 100 for j in range(prompt_len)] for i in range(num_requests)]


DECODE_TOKENS = 33  # a decode step = (time generating DECODE_TOKENS - time generating 1) / (DECODE_TOKENS - 1)


def decode_step_seconds(one_token_s: float, many_tokens_s: float) -> float:
    """One decode step from the times of generating 1 and DECODE_TOKENS tokens for the same rows (the prefill and
    the call's overhead cancel)."""
    return (many_tokens_s - one_token_s) / (DECODE_TOKENS - 1)


def measure(generate, decode_rows: list[int], prefill_lens: list[int], repeats: int,
            decode_contexts: list[int]) -> dict:
    """`generate(prompts, max_tokens) -> seconds`; the decode step (rows of prompts of each of `decode_contexts`
    tokens; keys "rows" for the first context, "rows@context" for the others) and prefill figures, min over repeats."""
    salt = iter(range(1, 1_000_000))
    generate(prompts_for(2, 16, next(salt)), 4)  # warm-up
    decode = {}
    for context in decode_contexts:
        for rows in decode_rows:
            one = min(generate(prompts_for(rows, context, next(salt)), 1) for _ in range(repeats))
            many = min(generate(prompts_for(rows, context, next(salt)), DECODE_TOKENS) for _ in range(repeats))
            key = str(rows) if context == decode_contexts[0] else f"{rows}@{context}"
            decode[key] = {"step_ms": 1e3 * decode_step_seconds(one, many)}
    prefill = {}
    for length in prefill_lens:
        seconds = min(generate(prompts_for(1, length, next(salt)), 1) for _ in range(repeats))
        prefill[str(length)] = {"ms": 1e3 * seconds, "tokens_per_s": length / seconds}
    return {"decode": decode, "prefill": prefill}
