"""The figures step_speed.py takes, in a module that imports nothing but the standard library, so that its vLLM
worker (another venv, without aptserve) times vLLM exactly as aptserve is timed."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def prompts_for(num_requests: int, prompt_len: int, salt: int) -> list[list[int]]:
    """Distinct token-id prompts (a salt per call, so no prefix cache ever serves one)."""
    return [[(7919 * salt + 104729 * i + 31 * j) % 40000 + 100 for j in range(prompt_len)] for i in range(num_requests)]


DECODE_TOKENS = 33  # tokens each decode row generates: its first, then 32 decode steps


def stepping_run(add_request: Callable[[str, list[int], int], None], step: Callable[[], list],
                 has_unfinished: Callable[[], bool]) -> Callable[[list[int], int], tuple[float, list[float]]]:
    """`run(prompts, max_tokens)` for `measure`, over an engine's own `add_request(request_id, prompt, max_tokens)`
    (greedy, ignore_eos) and `step()` (RequestOutputs): adds the prompts, steps until all finish and returns (seconds
    from the first add, the wall time of each step in which every row decoded, i.e. after each had its first token)."""
    request_ids = (str(i) for i in range(1_000_000_000))

    def run(prompts: list[list[int]], max_tokens: int) -> tuple[float, list[float]]:
        start = time.perf_counter()
        for prompt in prompts:
            add_request(next(request_ids), prompt, max_tokens)
        started: set[str] = set()
        decode_steps_s = []
        while has_unfinished():
            decoding = len(started) == len(prompts)
            step_start = time.perf_counter()
            outputs = step()
            if decoding:
                decode_steps_s.append(time.perf_counter() - step_start)
            started.update(o.request_id for o in outputs if o.outputs and o.outputs[0].token_ids)
        return time.perf_counter() - start, decode_steps_s

    return run


def decode_step_seconds(decode_steps_s: list[float]) -> float:
    """One decode step: the median of the steps timed in one call. A difference of whole calls (33 tokens minus 1)
    was used before; on a host that steals time from a call, two noisy totals made it swing 4x between engines."""
    return statistics.median(decode_steps_s)


def measure(run, decode_rows: list[int], prefill_lens: list[int], repeats: int, decode_contexts: list[int]) -> dict:
    """`run` from `stepping_run`; the decode step (rows of prompts of each of `decode_contexts`
    tokens; keys "rows" for the first context, "rows@context" for the others; the least median over repeats) and
    prefill figures (one prompt, one token; min over repeats)."""
    salt = iter(range(1, 1_000_000))
    run(prompts_for(2, 16, next(salt)), 4)  # warm-up
    decode = {}
    for context in decode_contexts:
        for rows in decode_rows:
            medians = [decode_step_seconds(run(prompts_for(rows, context, next(salt)), DECODE_TOKENS)[1])
                       for _ in range(repeats)]
            key = str(rows) if context == decode_contexts[0] else f"{rows}@{context}"
            decode[key] = {"step_ms": 1e3 * min(medians), "medians_ms": [1e3 * m for m in medians]}
    prefill = {}
    for length in prefill_lens:
        seconds = min(run(prompts_for(1, length, next(salt)), 1)[0] for _ in range(repeats))
        prefill[str(length)] = {"ms": 1e3 * seconds, "tokens_per_s": length / seconds}
    return {"decode": decode, "prefill": prefill}
