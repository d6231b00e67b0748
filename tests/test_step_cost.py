"""The step-time model: fitted from observed steps, and used to size prompt chunks so that a step holding
decoding requests stays within a share of their TBT SLO."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aptserve.config import ModelConfig
from aptserve.sampling import SamplingParams
from aptserve.sched.step_cost import StepCostFitter, StepCostModel, attention_work, fit
from aptserve.sched.tbt_allowance import tbt_allowance_s
from aptserve.sim.executor import LinearCostModel
from aptserve.sim.simulator import sim_engine
from tests.sim_fixtures import sim_args

MODEL = ModelConfig(path="sim", architecture="opt", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                    head_dim=16, vocab_size=1000, max_model_len=1024)


def test_fit_recovers_a_linear_step_time():
    truth = StepCostModel(base_s=0.012, per_token_s=0.0007, per_attention_s=2e-7)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(200):
        tokens, work = int(rng.integers(1, 600)), float(rng.uniform(0, 5e5))
        rows.append((tokens, work, truth.predict(tokens, work) * rng.uniform(0.98, 1.02)))
    fitted = fit(rows, StepCostModel())
    assert abs(fitted.base_s - truth.base_s) < 2e-3
    assert abs(fitted.per_token_s - truth.per_token_s) / truth.per_token_s < 0.05
    assert abs(fitted.per_attention_s - truth.per_attention_s) / truth.per_attention_s < 0.1


def test_fitter_keeps_its_prior_until_it_has_seen_enough_steps():
    prior = StepCostModel(0.05, 0.005, 1e-6)
    fitter = StepCostFitter(prior, refit_every=8, min_steps=16)
    for i in range(15):
        fitter.observe(10 + i, 100.0 * i, 0.01 + 0.001 * i)
    assert fitter.model == prior
    for i in range(16):
        fitter.observe(10 + i, 100.0 * i, 0.01 + 0.001 * i)
    assert fitter.model != prior
    assert all(abs(fitter.model.predict(10 + i, 100.0 * i) - (0.01 + 0.001 * i)) < 1e-4 for i in range(16))


def test_decodes_alone_keep_the_chunk_estimate_and_the_first_wrong_chunk_corrects_it():
    """A fresh server's prior underestimates prompt chunks twofold: a stretch of decodes alone (tokens, context and
    the fixed part all collinear) leaves its chunk estimate where it was, and the first chunk it got wrong refits
    the model at once to that chunk's time."""
    truth, prior = StepCostModel(0.02, 0.002, 1e-7), StepCostModel(0.01, 0.001, 1e-7)
    fitter = StepCostFitter(prior)
    chunk = (256, attention_work(0, 256))
    for i in range(100):
        fitter.observe(1, 256.0 + i, truth.predict(1, 256.0 + i))
    assert abs(fitter.model.predict(*chunk) - prior.predict(*chunk)) < 0.01 * prior.predict(*chunk)
    assert abs(fitter.model.predict(1, 300.0) - truth.predict(1, 300.0)) < 0.01 * truth.predict(1, 300.0)
    fitter.observe(257, chunk[1] + 256, truth.predict(257, chunk[1] + 256))
    assert abs(fitter.model.predict(*chunk) - truth.predict(*chunk)) < 0.02 * truth.predict(*chunk)


@given(target=st.floats(0.001, 1.0), base=st.integers(0, 64), work=st.floats(0, 1e5), context=st.integers(0, 900))
@settings(max_examples=300, deadline=None)
def test_the_extra_tokens_fit_the_target_and_one_more_would_not(target, base, work, context):
    model = StepCostModel(0.01, 0.0007, 2e-7)
    n = model.max_extra_tokens(target, base, work, context)
    if n == 0:
        return
    assert model.predict(base + n, work + attention_work(context, n)) <= target * (1 + 1e-9)
    assert model.predict(base + n + 2, work + attention_work(context, n + 2)) > target


def test_the_fit_learns_what_scoring_prompt_tokens_costs_and_sizes_a_scored_chunk_by_it():
    truth = StepCostModel(base_s=0.02, per_token_s=0.001, per_attention_s=0.0, per_scored_token_s=0.0005)
    fitter = StepCostFitter(StepCostModel(base_s=0.02, per_token_s=0.001, per_attention_s=0.0), min_steps=16)
    for i in range(20):  # decodes and unscored chunks: nothing says what scoring costs yet
        tokens = 1 + 25 * i
        fitter.observe(tokens, 0.0, truth.predict(tokens, 0.0))
    assert fitter.model.per_scored_token_s == 0.0
    # 1.43x its prediction, no surprise: it is refit at once because scoring had no price yet
    fitter.observe(128, 0.0, truth.predict(128, 0.0, scored_tokens=128), scored_tokens=128)
    assert abs(fitter.model.per_scored_token_s - truth.per_scored_token_s) < 1e-4
    unscored = fitter.model.max_extra_tokens(0.2, 1, 0.0, 0)
    scored = fitter.model.max_extra_tokens(0.2, 1, 0.0, 0, scored_chunk=True)
    assert abs(unscored - 179) <= 1 and abs(scored - 119) <= 1  # (0.2 - 0.021) / 0.001 and / 0.0015


def test_rows_without_scored_tokens_fit_as_before():
    rows = [(t, 0.0, 0.01 + 0.001 * t) for t in range(1, 40)]
    assert fit(rows, StepCostModel()) == fit([(*row, 0) for row in rows], StepCostModel())


def test_step_tbt_fraction_keeps_every_decoding_request_within_its_p99_tbt():
    """Long prompts arriving among decoding requests: without the bound they run in single long steps and the
    decoding requests miss their P99 TBT SLO; with it, prompt chunks are sized to the gaps each decoding request
    can still take (one long gap is within P99 for a 60-token answer, two are not), and none misses it."""
    cost = LinearCostModel(base_s=0.01, per_token_s=0.001, per_context_token_s=0.0, per_recompute_token_s=0.0)
    worst_p99 = {}
    for fraction in (0.0, 0.8):
        args = sim_args(MODEL, 2000, block_size=16, scheduler="apt-chunked", max_num_batched_tokens=1024,
                        step_tbt_fraction=fraction, tbt_slo=0.1, ttft_slo=5.0)
        engine, clock = sim_engine(args, MODEL, cost)
        decoding = [engine.add_request(list(range(3, 13)), SamplingParams(max_tokens=60, ignore_eos=True)).request_id
                    for _ in range(4)]
        finished = {}

        def step() -> None:
            finished.update({o.request_id: o for o in engine.step() if o.finished})

        for _ in range(40):  # decoding, long enough for the engine to learn the step cost
            step()
        for _ in range(2):
            engine.add_request(list(range(3, 903)), SamplingParams(max_tokens=4, ignore_eos=True))
            for _ in range(3):
                step()
        while engine.has_unfinished_requests():
            step()
        assert len(finished) == 6 and engine.cache.num_free_units == engine.cache.num_units
        worst_p99[fraction] = max(float(np.percentile(np.diff(finished[r].metrics.token_times_s), 99))
                                  for r in decoding if r in finished)
    assert worst_p99[0.0] > 0.1  # two 0.9 s steps in the last 14 gaps of each
    assert worst_p99[0.8] < 0.1


@given(num_gaps=st.integers(1, 400), num_slow=st.integers(0, 6), slow_s=st.floats(1.01, 5.0),
       typical_s=st.floats(0.0, 0.5))
@settings(max_examples=300, deadline=None)
def test_the_planned_gap_stays_within_the_slo_and_keeps_the_p99_there(num_gaps, num_slow, slow_s, typical_s):
    """No request is planned a gap past its P99 TBT SLO (1 s here), and for one that can still meet it, taking the
    planned gap (its other gaps no longer) keeps its P99 within it."""
    num_slow = min(num_slow, num_gaps - 1)
    allowance = tbt_allowance_s(num_gaps, num_slow, slow_s if num_slow else 0.0, 1.0)
    past = [slow_s] * num_slow
    assert 0 < allowance <= 1.0
    if np.percentile(past + [0.0] * (num_gaps - num_slow), 99) > 1.0:  # lost, however short its next gaps
        assert allowance == 1.0
        return
    gaps = past + [allowance] + [min(typical_s, allowance)] * (num_gaps - num_slow - 1)
    assert np.percentile(gaps, 99) <= 1.0 + 1e-9


def test_chunks_that_run_slower_than_predicted_shrink_the_next_chunks_within_a_bounded_margin():
    model = StepCostModel(base_s=0.02, per_token_s=0.001, per_attention_s=0.0)
    fitter = StepCostFitter(model, refit_every=10_000, min_steps=10_000)  # never refits: the margin alone acts
    for _ in range(4):
        fitter.observe(1, 0.0, 1.3 * model.predict(1, 0.0))  # decodes: not chunks, no margin
    assert fitter.model.chunk_margin == 1.0
    for _ in range(8):
        fitter.observe(300, 0.0, 1.3 * model.predict(300, 0.0))
    assert abs(fitter.model.chunk_margin - 1.3) < 0.01
    # planned within 0.4 s / 1.3: (0.4 / 1.3 - 0.021) / 0.001 tokens join a step of one decode
    assert abs(fitter.model.max_extra_tokens(0.4, 1, 0.0, 0) - 286) <= 1
    for _ in range(8):
        fitter.observe(300, 0.0, 3.0 * model.predict(300, 0.0))  # something else slowed every step 3x
    assert fitter.model.chunk_margin == 1.5
    for _ in range(12):
        fitter.observe(300, 0.0, 0.8 * model.predict(300, 0.0))  # faster than predicted: no margin below 1
    assert fitter.model.chunk_margin == 1.0
    fitter.observe(300, 0.0, 1.3 * model.predict(300, 0.0))
    fitter.forget_chunk_margin()
    assert fitter.model.chunk_margin == 1.0 and fitter.model.max_extra_tokens(0.4, 1, 0.0, 0) == 379
