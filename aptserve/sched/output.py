"""The seam between scheduler and executor (vLLM v1's contract, simplified for a stateless runner).

The scheduler sends, per step, the full picture each scheduled request needs (its new tokens, its
absolute start position, its whole unit table); the executor keeps no cache bookkeeping of its own,
only per-request sampler state (seeded generators), dropped when a request id appears in
`finished_request_ids`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from aptserve.cache.tables import CacheKind
from aptserve.logprobs import TokenLogprobs
from aptserve.sampling import SamplingParams


# Not frozen: one is built per scheduled request every step, and a frozen dataclass's __init__ sets each field
# through object.__setattr__ (about three times the cost).
@dataclass(slots=True)
class ScheduledRequest:
    request_id: str
    # Tokens fed this step: all_token_ids[start_pos : start_pos + len(token_ids)]. One token for a decode.
    token_ids: list[int]
    # Absolute position of token_ids[0]; the cache already holds rows for positions [0, start_pos).
    start_pos: int
    cache_kind: CacheKind
    # The request's whole table after this step's allocation (layout: cache/manager.py).
    unit_ids: list[int]
    # True when this step reaches the request's last known token, so a new token is sampled.
    sample: bool
    sampling_params: SamplingParams
    # The request's own token lists (shared, not copied: the runner shares the scheduler's process), passed only
    # to a sampled row whose params read them: penalties count the tokens so far, min_tokens the outputs.
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens attended to by this step's last token (cached plus new)."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True, slots=True)
class CacheConversion:
    """Move a request's first `num_tokens` cache rows from one table to another, in place.

    HIDDEN -> KV projects the stored hidden rows to K/V (one GEMM per layer); KV -> HIDDEN solves K/V back to
    the hidden rows (a demotion, CacheManager.demote: multi-head attention only; elsewhere KV -> HIDDEN is a
    preemption and a re-prefill into HIDDEN). The executor applies every conversion before the step's forward pass;
    `src_unit_ids` are already free in the pool (a demotion's may be its own `dst_unit_ids`) and may be reused by
    this step's writes, which happen after the conversion has read them.
    """

    request_id: str
    num_tokens: int
    src_kind: CacheKind
    src_unit_ids: list[int]
    dst_kind: CacheKind
    dst_unit_ids: list[int]


@dataclass(slots=True)
class SchedulerOutput:
    step_id: int
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests that finished or were aborted since the previous step.
    finished_request_ids: list[str] = field(default_factory=list)
    # Applied by the executor before the forward pass.
    conversions: list[CacheConversion] = field(default_factory=list)
    # Pool units lent to the recompute scratch (cache/manager.py): set while hidden requests hold rows.
    scratch_unit_ids: tuple[int, ...] = ()

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(r.num_tokens for r in self.scheduled)

    @property
    def num_context_tokens(self) -> int:
        """Tokens attended to, summed over the scheduled requests (what attention reads)."""
        return sum(r.context_len for r in self.scheduled)

    @property
    def num_recompute_tokens(self) -> int:
        """Tokens whose K/V are re-projected from hidden rows this step: hidden contexts and conversions."""
        return (sum(r.context_len for r in self.scheduled if r.cache_kind == CacheKind.HIDDEN)
                + sum(c.num_tokens for c in self.conversions))

    @property
    def num_scored_tokens(self) -> int:
        """Prompt tokens this step's chunks score for their logprobs."""
        return sum(r.num_tokens for r in self.scheduled if r.sampling_params.prompt_logprobs is not None
                   and r.prompt_token_ids is not None and r.start_pos < len(r.prompt_token_ids))

    def cost_features(self) -> list[float]:
        """What a linear step-cost model prices, in order: 1, tokens fed, context tokens, recompute tokens."""
        return [1.0, float(self.total_num_scheduled_tokens), float(self.num_context_tokens),
                float(self.num_recompute_tokens)]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class RunnerOutput:
    # One new token per scheduled request whose `sample` was True, unless the request is in `failed`.
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    # Requests the executor could not serve this step, and why (the engine finishes them with that error, alone).
    failed: dict[str, str] = field(default_factory=dict)
    # Log probabilities of the sampled tokens of the requests that asked for them, and of the prompt tokens this
    # step computed the logits of: (the first one's position in the prompt, one per token).
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # Seconds the step spent building its inputs, in the forward pass and sampling (step accounting; the
    # simulator reports its cost model's prediction as forward time).
    prepare_s: float = 0.0
    forward_s: float = 0.0
    sample_s: float = 0.0
    # The CPU threads the step ran on (0: not a CPU step).
    num_threads: int = 0
