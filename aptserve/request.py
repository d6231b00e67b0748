"""Request: the token ids, status, cache kind and timestamps of one generation request."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from aptserve.cache.tables import CacheKind
from aptserve.logprobs import TokenLogprobs
from aptserve.sampling import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Every status after PREEMPTED means finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_s: float
    ttft_slo_s: float = 1.0
    tbt_slo_s: float = 1.0
    eos_token_ids: tuple[int, ...] = ()

    status: RequestStatus = RequestStatus.WAITING
    cache_kind: CacheKind = CacheKind.KV
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose cache rows exist (prompt and outputs); a decode step computes the one token after them.
    num_computed_tokens: int = 0
    first_scheduled_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    num_conversions: int = 0
    # Gaps between this request's tokens above its TBT SLO, and the longest gap (they bound the steps it can
    # still take without missing its P99 TBT SLO: sched/tbt_allowance.py).
    num_slow_gaps: int = 0
    max_gap_s: float = 0.0
    # Content keys of its full blocks (cache/prefix.py), extended as tokens come; prompt tokens served from the
    # prefix cache at its first admission.
    block_keys: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0
    # Log probabilities of prompt tokens 1.. (if its params ask for them), as chunks compute them.
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # The stop token id that finished it (a stop_token_ids member; None for EOS, a length stop or an abort).
    stop_token_id: int | None = None
    # Prompt plus output tokens, counted as outputs are appended (the scheduler reads it several times per request
    # every step; output_token_ids grows only through append_output_token).
    num_tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.num_tokens = len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without building the whole list (a decode step's is one token)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= stop:
            return []
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:stop - num_prompt]
        if stop <= num_prompt:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - num_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def last_token_s(self) -> float:
        """When this request last produced a token (its arrival if none yet): the base of its pending time."""
        return self.token_times_s[-1] if self.token_times_s else self.arrival_s

    def is_past_slo(self, now: float) -> bool:
        """True when the pending time already exceeds the SLO that applies now (TTFT before the first token)."""
        slo = self.tbt_slo_s if self.output_token_ids else self.ttft_slo_s
        return now - self.last_token_s > slo

    def append_output_token(self, token_id: int, now: float) -> None:
        if self.token_times_s:
            gap_s = now - self.token_times_s[-1]
            self.num_slow_gaps += gap_s > self.tbt_slo_s
            self.max_gap_s = max(self.max_gap_s, gap_s)
        self.output_token_ids.append(token_id)
        self.num_tokens += 1
        self.token_times_s.append(now)

    def keep_prompt_logprobs(self, position: int, scored: list[TokenLogprobs]) -> None:
        """Keep the log probabilities of prompt tokens `position`.. that a chunk scored, each once (a recompute
        after preemption scores them again)."""
        kept = self.prompt_logprobs  # kept[i] is prompt token i + 1's
        if position <= len(kept) + 1:
            kept.extend(scored[len(kept) + 1 - position:])

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)
