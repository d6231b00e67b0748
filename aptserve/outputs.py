"""What the engine returns per request (vLLM's RequestOutput shape).

What an output carries depends on the request's `SamplingParams.output_kind`: everything so far
(CUMULATIVE), only what is new since the previous output (DELTA), or one output at the end (FINAL_ONLY).
"""
from __future__ import annotations

from dataclasses import dataclass

from aptserve.logprobs import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # One per token in token_ids, when the request asked for log probabilities.
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class RequestStats:
    """When things happened to one request (engine clock seconds); attached to its finished output."""

    arrival_s: float
    first_scheduled_s: float | None
    first_token_s: float | None
    token_times_s: list[float]
    num_preemptions: int = 0
    num_conversions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # Set on the finished output only (copying token times every step would cost O(n^2) per request).
    metrics: RequestStats | None = None
    # Set when the request was aborted because its batch failed in the executor.
    error: str | None = None
    # Tokens generated so far, whatever the output kind (a DELTA output's token_ids hold only the new ones).
    num_output_tokens: int = 0
    # Prompt tokens served from the prefix cache instead of computed.
    num_cached_tokens: int = 0
    # Log probabilities of prompt tokens 1.. when asked for (a stream's first output carries them).
    prompt_logprobs: list[TokenLogprobs] | None = None
