"""How many prompt tokens a chunked step gives a request beside its token budget: what keeps the step within the
TBT SLOs of the requests decoding in it, and what is left of the step's share of prompt scoring."""
from __future__ import annotations

import math

from aptserve.cache.tables import CacheKind
from aptserve.request import Request
from aptserve.sched.output import SchedulerOutput
from aptserve.sched.step_cost import StepCostModel, attention_work
from aptserve.sched.tbt_allowance import next_gap_allowance_s

# The smallest prompt chunk a step takes even when the step-time bound leaves no room, so prompts progress.
MIN_CHUNK_TOKENS = 32
# Prompt tokens a chunked step scores at most (prompt logprobs, all requests together): each costs a row of the
# vocabulary-wide head, softmax and top-k besides its forward (the step-time model learns that price once it has
# seen scored steps; the cap bounds the steps before).
SCORED_PROMPT_TOKENS_PER_STEP = 128


def chunk_cap(out: SchedulerOutput, request: Request, running: list[Request], step_cost: StepCostModel,
              step_tbt_fraction: float, now: float) -> int:
    """Most prompt tokens `request` may add to the step `out` is building. With `step_tbt_fraction` set and
    requests decoding: as many as keep the step's predicted time within that share of the gap planned for every
    decoding request (its TBT SLO while it can still meet it: sched/tbt_allowance.py); the step's first chunk gets
    at least MIN_CHUNK_TOKENS, so prompts always progress. A prompt scored for its logprobs takes at most what the
    step's other scored chunks leave of SCORED_PROMPT_TOKENS_PER_STEP."""
    cap = scoring_cap(out, request)
    decoding = [r for r in running if r.output_token_ids and r is not request]
    if step_tbt_fraction <= 0 or not decoding:
        return cap
    num_tokens = sum(r.num_tokens for r in out.scheduled)
    work = sum(attention_work(r.start_pos, r.num_tokens) for r in out.scheduled)
    target_s = next_gap_allowance_s(decoding, now)
    if math.isinf(target_s):
        return cap
    recompute = out.num_recompute_tokens + (request.num_computed_tokens if request.cache_kind == CacheKind.HIDDEN
                                            else 0)
    fits = step_cost.max_extra_tokens(step_tbt_fraction * target_s, num_tokens, work, request.num_computed_tokens,
                                      recompute, out.num_scored_tokens, is_scored(request))
    has_chunk = any(r.num_tokens > 1 for r in out.scheduled)
    return min(cap, fits if has_chunk else max(MIN_CHUNK_TOKENS, fits))


def scoring_cap(out: SchedulerOutput, request: Request) -> int:
    if not is_scored(request):
        return request.num_tokens
    return max(0, SCORED_PROMPT_TOKENS_PER_STEP - out.num_scored_tokens)


def is_scored(request: Request) -> bool:
    """Whether the request's next prompt tokens are scored for their logprobs."""
    params = request.sampling_params
    return params.prompt_logprobs is not None and request.num_computed_tokens < request.num_prompt_tokens

