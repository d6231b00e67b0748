"""What crosses between the front end (HTTP, tokenizer, detokenizer) and the engine core (scheduler, forward).

The same structs serve the in-process engine and the engine-core process; across the process boundary they are
msgpack-encoded by msgspec (compact, and decoded straight into typed objects).
"""
from __future__ import annotations

import msgspec

from aptserve.core.snapshot import ReplicaSnapshot
from aptserve.logprobs import TokenLogprobs
from aptserve.sampling import SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request the door has accepted: token ids, resolved params, arrival (core clock) and SLOs."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_s: float
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request's news from one step: its new token(s), and how it finished if it did."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id that ended it
    error: str | None = None  # the engine gave up on it (its batch failed)
    first_scheduled_s: float | None = None  # set on the first output
    num_preemptions: int = 0
    num_conversions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (set on the first output)
    new_logprobs: list[TokenLogprobs] | None = None  # one per new token, if the request asked for them
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 1.. (set on the first output, if asked for)


class StepStats(msgspec.Struct, array_like=True):
    """Where one engine step's time went (wall seconds), for /metrics and --log-step-stats."""

    step_id: int
    num_requests: int
    num_decode_tokens: int
    num_prefill_tokens: int
    schedule_s: float
    prepare_s: float
    forward_s: float
    sample_s: float
    update_s: float  # token bookkeeping and stop checks after the forward
    gap_s: float  # since the previous step ended: the loop's own work (inputs, outputs) and idle time
    # What a step-cost model prices besides the tokens: context tokens attended, tokens re-projected from hidden rows.
    num_context_tokens: int = 0
    num_recompute_tokens: int = 0
    num_threads: int = 0  # the CPU threads the forward ran on (0: not on a CPU)


class EngineStats(msgspec.Struct, array_like=True):
    """The engine's gauges after a step: queues, cache use by kind, counters."""

    num_running: int
    num_waiting: int
    cache_units_total: int
    cache_units: dict[str, int]
    num_preemptions: int
    num_conversions: int
    num_steps: int
    hybrid_cache: str
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache at first admissions
    prefix_cache_hits: int = 0  # ... and found there
    admissions: dict[str, int] = msgspec.field(default_factory=dict)  # admissions to the batch, by cache kind
    num_demotions: int = 0  # running KV requests demoted to hidden rows where memory ran out (not preempted)


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    """Everything one step produced; `timestamp_s` (core clock) is when its tokens came out."""

    timestamp_s: float
    outputs: list[EngineCoreOutput] = []
    step: StepStats | None = None
    stats: EngineStats | None = None
    snapshot: ReplicaSnapshot | None = None  # the answer to a PollSnapshot


class AbortRequests(msgspec.Struct, array_like=True, tag=True):
    request_ids: list[str]


class AddRequest(msgspec.Struct, array_like=True, tag=True):
    request: EngineCoreRequest


class PollSnapshot(msgspec.Struct, array_like=True, tag=True):
    """A router asks for the core's state (answered between steps, in EngineCoreOutputs.snapshot)."""


class Shutdown(msgspec.Struct, array_like=True, tag=True):
    pass


# Front end -> engine core.
CoreInput = AddRequest | AbortRequests | PollSnapshot | Shutdown
