"""A served engine core runs a few real steps before its first request, so its step-time model starts from this
machine's own step times, and then starts afresh: nothing of the warm-up shows in its counters, cache or runner."""
from __future__ import annotations

import pytest

from aptserve.core.engine_core import WARM_UP_OUTPUT_TOKENS, WARM_UP_PROMPTS, build_engine_core
from aptserve.engine_args import EngineArgs
from aptserve.sched.step_cost import StepCostModel


@pytest.fixture(scope="module")
def warmed_core():
    core = build_engine_core(EngineArgs(model="default", kv_cache_memory=32 << 20))
    prior = core.scheduler.step_cost
    core.warm_up()
    return core, prior


def test_warm_up_fits_the_step_time_model_on_real_steps(warmed_core):
    core, prior = warmed_core
    rows = core.step_cost_fitter.rows
    # each prompt in one chunk (or more), then its decodes: at least the fitter's min_steps rows
    assert len(rows) >= len(WARM_UP_PROMPTS) * WARM_UP_OUTPUT_TOKENS
    assert max(row[0] for row in rows) >= max(length for length, _ in WARM_UP_PROMPTS) // 2  # a real chunk was timed
    model = core.scheduler.step_cost
    assert model is core.step_cost_fitter.model and model != prior and model != StepCostModel()
    # a prompt was scored for its logprobs, so the first echo request is planned with scoring's price
    assert max(row[3] for row in rows) > 0 and model.per_scored_token_s > 0
    assert all(row[2] > 0 for row in rows)


def test_after_warm_up_the_engine_starts_afresh(warmed_core):
    core, _ = warmed_core
    scheduler = core.scheduler
    assert core.num_steps == 0 and not scheduler.requests and not scheduler.has_unfinished_requests()
    assert scheduler.num_admissions == {"kv": 0, "hidden": 0} and scheduler.num_prefix_query_tokens == 0
    assert scheduler.cache.num_free_units == scheduler.cache.num_units
    scheduler.check_invariants()
