"""The real engine loop and scheduler under a simulated clock and executor: nothing lost, no over-commit."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aptserve.config import ModelConfig
from aptserve.errors import InvalidRequestError
from aptserve.request import Request
from aptserve.sampling import SamplingParams
from aptserve.sched.chunk_size import SCORED_PROMPT_TOKENS_PER_STEP
from aptserve.sim.executor import CostModelExecutor
from aptserve.sim.simulator import sim_engine
from tests.sim_fixtures import sim_args

MODEL = ModelConfig(path="sim", architecture="opt", num_layers=2, hidden_size=64, num_heads=4,
                    num_kv_heads=4, head_dim=16, vocab_size=1000, max_model_len=512, eos_token_ids=(2,))


def make_engine(num_units: int, policy: str = "fcfs", max_num_seqs: int = 8, budget: int = 512):
    args = sim_args(MODEL, num_units, block_size=4, scheduler=policy, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=budget)
    return sim_engine(args, MODEL)


def run_random_trace(engine, clock, num_requests: int, seed: int, rate: float = 50.0):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, num_requests))
    lengths = rng.integers(1, 40, size=(num_requests, 2))
    finished, next_arrival, num_steps = {}, 0, 0
    while next_arrival < num_requests or engine.has_unfinished_requests():
        while next_arrival < num_requests and arrivals[next_arrival] <= clock.now():
            prompt_len, max_tokens = map(int, lengths[next_arrival])
            engine.add_request(list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens),
                               request_id=f"r{next_arrival}")
            next_arrival += 1
        if not engine.has_unfinished_requests():
            clock.time_s = float(arrivals[next_arrival])
            continue
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        engine.scheduler.check_invariants()
        num_steps += 1
        assert num_steps < 20_000, "livelock: the trace does not drain"
    return finished, lengths


POLICIES = ["fcfs", "chunked", "apt", "apt-chunked"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_pool_loses_nothing_and_preempts(policy, seed):
    # 80 tokens of KV, far below the offered load; a small token budget makes chunked split prompts.
    engine, clock = make_engine(num_units=40, policy=policy, budget=16)
    finished, lengths = run_random_trace(engine, clock, num_requests=60, seed=seed)
    assert len(finished) == 60
    for i, (_, max_tokens) in enumerate(lengths):
        output = finished[f"r{i}"]
        assert len(output.outputs[0].token_ids) == max_tokens
        assert output.outputs[0].finish_reason == "length"
    assert engine.scheduler.num_preemptions > 0
    assert engine.cache.num_free_units == engine.cache.num_units


@pytest.mark.parametrize("policy", ["chunked", "apt-chunked"])
def test_a_step_with_no_room_for_another_chunk_admits_nobody(policy):
    # A tight TBT SLO leaves later chunks no time (their cap is 0): a request admitted then would hold a batch
    # slot with no token scheduled.
    args = sim_args(MODEL, 400, block_size=4, scheduler=policy, max_num_seqs=16, max_num_batched_tokens=512,
                    tbt_slo=0.02)
    engine, clock = sim_engine(args, MODEL)
    scheduler, schedule, num_tokens = engine.scheduler, engine.scheduler.schedule, []
    scheduler.schedule = lambda now: (out := schedule(now), num_tokens.extend(r.num_tokens for r in out.scheduled))[0]
    rng = np.random.default_rng(1)
    for i in range(120):
        engine.add_request(list(range(3, 3 + int(rng.integers(16, 300)))),
                           SamplingParams(max_tokens=int(rng.integers(2, 100))), request_id=str(i),
                           arrival_s=i * 0.02)
    while engine.has_unfinished_requests():
        engine.step()
    assert num_tokens and min(num_tokens) >= 1


@pytest.mark.parametrize("policy", ["chunked", "apt-chunked"])
def test_prompt_scoring_is_spread_over_steps(policy):
    # Four 400-token prompts scored for their logprobs beside a decoding request: no step scores more than
    # SCORED_PROMPT_TOKENS_PER_STEP of them, and all four are scored in full.
    engine, clock = make_engine(num_units=2000, policy=policy, budget=512)
    scheduler, schedule, per_step = engine.scheduler, engine.scheduler.schedule, []
    scheduler.schedule = lambda now: (out := schedule(now), per_step.append(
        sum(r.num_tokens for r in out.scheduled if r.sampling_params.prompt_logprobs is not None)))[0]
    engine.add_request(list(range(3, 13)), SamplingParams(max_tokens=100), request_id="bystander")
    engine.step()
    for i in range(4):
        engine.add_request(list(range(3, 403)), SamplingParams(max_tokens=1, prompt_logprobs=2), request_id=str(i))
    while engine.has_unfinished_requests():
        engine.step()
    assert max(per_step) == SCORED_PROMPT_TOKENS_PER_STEP and sum(per_step) == 4 * 400


@pytest.mark.parametrize("policy", POLICIES)
def test_preempted_request_keeps_its_tokens_and_timestamps(policy):
    engine, clock = make_engine(num_units=40, max_num_seqs=8, policy=policy, budget=16)
    finished, _ = run_random_trace(engine, clock, num_requests=10, seed=5, rate=1000.0)
    preempted = [o for o in finished.values() if o.metrics.num_preemptions > 0]
    assert preempted, "the tiny pool should force preemption"
    for output in finished.values():
        times = output.metrics.token_times_s
        assert len(times) == len(output.outputs[0].token_ids)
        assert times == sorted(times) and output.metrics.first_token_s == times[0]
        assert output.metrics.arrival_s <= output.metrics.first_scheduled_s <= times[0]


def test_request_that_never_fits_is_rejected_up_front():
    engine, _ = make_engine(num_units=10)  # 5 KV blocks = 20 tokens
    with pytest.raises(InvalidRequestError, match="length is 20 tokens .*raise kv_cache_memory.*lower max_tokens"):
        engine.add_request(list(range(3, 13)), SamplingParams(max_tokens=11))
    assert not engine.has_unfinished_requests()
    engine.add_request(list(range(3, 13)), SamplingParams(max_tokens=10))  # exactly 20 tokens: fits


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(max_tokens=4), "prompt is empty"),
    (list(range(3, 600)), SamplingParams(max_tokens=4), "maximum context length is 400 tokens \\(all the cache pool"),
    (list(range(3, 350)), SamplingParams(max_tokens=100), "lower max_tokens"),
    ([5, 1000], SamplingParams(max_tokens=4), "token ids must be integers"),
])
def test_bad_requests_are_rejected_and_the_engine_keeps_serving(prompt, params, match):
    engine, clock = make_engine(num_units=200)
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=3), request_id="good")
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request(prompt, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.request_id for o in outputs if o.finished] == ["good"]
    assert len(outputs[-1].outputs[0].token_ids) == 3


def test_max_tokens_below_one_is_a_typed_error():
    with pytest.raises(InvalidRequestError, match="max_tokens must be an integer >= 1"):
        SamplingParams(max_tokens=0)


def test_abort_returns_every_unit_and_keeps_others_running():
    engine, _ = make_engine(num_units=100)
    engine.add_request([5] * 10, SamplingParams(max_tokens=20), request_id="a")
    engine.add_request([6] * 10, SamplingParams(max_tokens=5), request_id="b")
    engine.step()
    engine.step()
    assert engine.cache.num_free_units < 100
    engine.abort_request("a")
    engine.scheduler.check_invariants()
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["b"]
    assert engine.cache.num_free_units == 100


def test_eos_and_stop_token_ids_finish_a_request():
    engine, _ = make_engine(num_units=100)
    engine.executor.token_id = 2  # the model's EOS
    engine.add_request([5, 6], SamplingParams(max_tokens=10), request_id="eos")
    engine.add_request([5, 6], SamplingParams(max_tokens=10, ignore_eos=True), request_id="ignore")
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["eos"].outputs[0].token_ids == [2] and outs["eos"].outputs[0].finish_reason == "stop"
    assert len(outs["ignore"].outputs[0].token_ids) == 10


class RecordingExecutor(CostModelExecutor):
    def __init__(self, clock, cost_model) -> None:
        super().__init__(clock, cost_model)
        self.steps = []

    def execute(self, sched_out):
        self.steps.append(sched_out)
        return super().execute(sched_out)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_preempted_request_resumes_from_its_own_cached_blocks(policy):
    """Distinct prompts and a pool too small for all: preempted requests come back past the blocks they had
    computed (still cached, unless memory had to evict them), and nothing leaks."""
    args = sim_args(MODEL, 80, block_size=4, scheduler=policy, max_num_seqs=8, max_num_batched_tokens=64)
    engine, clock = sim_engine(args, MODEL, make_executor=RecordingExecutor)
    for i in range(8):
        engine.add_request([3 + i] + list(range(100 + 40 * i, 130 + 40 * i)), SamplingParams(max_tokens=30),
                           request_id=f"r{i}")
    while engine.has_unfinished_requests():
        engine.step()
        engine.scheduler.check_invariants()
    resumes, just_preempted = [], set()  # where each preempted request starts again
    for step in engine.executor.steps:
        for scheduled in step.scheduled:
            if scheduled.request_id in just_preempted:
                resumes.append(scheduled.start_pos)
                just_preempted.discard(scheduled.request_id)
        just_preempted |= set(step.preempted_request_ids)
    assert engine.scheduler.num_preemptions > 0 and resumes and max(resumes) >= 16
    assert engine.scheduler.num_prefix_hit_tokens == 0  # distinct prompts: no first admission hit
    assert engine.cache.num_free_units == engine.cache.num_units


@given(st.lists(st.integers(0, 9), min_size=1, max_size=12), st.lists(st.integers(0, 9), max_size=12),
       st.integers(0, 30), st.integers(0, 30))
def test_a_request_slices_its_tokens_as_the_whole_list_would(prompt, outputs, start, stop):
    request = Request("r", prompt, SamplingParams(), 0.0, ttft_slo_s=1.0, tbt_slo_s=0.25)
    for token_id in outputs:
        request.append_output_token(token_id, 1.0)
    assert request.num_tokens == len(prompt) + len(outputs)
    assert request.token_ids_slice(start, stop) == request.all_token_ids[start:stop]
