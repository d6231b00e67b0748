"""The apt greedy over a bounded set of candidates: the waiting queue's shape index agrees with brute force, and
the policies decide as they did when every waiting request was priced (always on short queues; on long ones
whenever memory, not the bound, stops the greedy)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptserve.config import ModelConfig
from aptserve.request import Request
from aptserve.sampling import SamplingParams
from aptserve.sched import apt_scheduler
from aptserve.sched.apt import KnapsackItem, _steps, first_gain, options
from aptserve.sched.apt_candidates import MIN_CANDIDATES, waiting_candidates
from aptserve.sched.waiting import WaitingQueue
from aptserve.sim.simulator import sim_engine
from tests.sim_fixtures import sim_args

MHA = ModelConfig(path="sim", architecture="opt", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                  head_dim=16, vocab_size=1000, max_model_len=512)


@given(st.integers(1, 30), st.floats(-1, 100), st.one_of(st.none(), st.integers(1, 30)), st.floats(-50, 100),
       st.integers(0, 60))
@settings(max_examples=2000, deadline=None)
def test_first_gain_is_the_walks_first_step(kv_units, kv_value, hidden_units, hidden_value, budget):
    item = KnapsackItem("a", kv_units, kv_value, hidden_units, None if hidden_units is None else hidden_value)
    steps = _steps([item], budget)
    gain = first_gain(*options(item.kv_units, item.kv_value, item.hidden_units, item.hidden_value, budget))
    assert gain == (steps[0].gain_per_unit if steps else None)


def make_request(i: int, num_tokens: int, arrival_s: float, num_outputs: int = 0) -> Request:
    request = Request(str(i), list(range(num_tokens)), SamplingParams(), arrival_s, ttft_slo_s=1.0, tbt_slo_s=0.25)
    for k in range(num_outputs):
        request.append_output_token(7, arrival_s + 0.1 * (k + 1))
    return request


def test_waiting_queue_keeps_deque_order_and_counts_live_requests():
    rng = np.random.default_rng(0)
    queue, reference, now = WaitingQueue(block_size=4), [], 10.0
    for i in range(400):
        if reference and rng.random() < 0.3:
            victim = reference.pop(int(rng.integers(len(reference))))
            queue.remove(victim)
            assert victim not in queue
        else:
            request = make_request(i, int(rng.integers(1, 40)), float(rng.uniform(0, now)), int(rng.integers(0, 3)))
            front = rng.random() < 0.3
            (queue.appendleft if front else queue.append)(request)
            reference.insert(0, request) if front else reference.append(request)
        assert list(queue) == reference and len(queue) == len(reference)
        assert not reference or queue[0] is reference[0]
        assert queue.num_live(now) == sum(not r.is_past_slo(now) for r in reference)
        assert queue.sum_last_token_s == pytest.approx(sum(r.last_token_s for r in reference))
    assert all(r in queue for r in reference)


def long_queue_engine(policy: str, num_units: int, num_waiting: int, seed: int, hybrid: str = "on"):
    args = sim_args(MHA, num_units, block_size=4, hybrid_cache=hybrid, scheduler=policy, max_num_seqs=8,
                    max_num_batched_tokens=256, alpha=0.002)
    engine, clock = sim_engine(args, MHA)
    rng = np.random.default_rng(seed)
    clock.time_s = 3.0
    for i, arrival_s in enumerate(np.sort(rng.uniform(0, 3.0, num_waiting))):
        engine.add_request(list(range(3, 3 + int(rng.integers(2, 60)))), SamplingParams(max_tokens=4),
                           request_id=str(i), arrival_s=float(arrival_s))
    return engine, clock


def full_plan(scheduler, now):
    """The plan with every waiting request priced: the implementation before the bound."""
    saved, apt_scheduler.waiting_candidates = apt_scheduler.waiting_candidates, lambda queue, *_: list(queue)
    try:
        return scheduler._plan(now, scheduler._num_live(now), upgrades=True)
    finally:
        apt_scheduler.waiting_candidates = saved


@pytest.mark.parametrize("hybrid", ["on", "off", "all-hidden"])
def test_candidates_are_the_top_of_the_walk(hybrid):
    engine, clock = long_queue_engine("apt-chunked", num_units=4000, num_waiting=300, seed=1, hybrid=hybrid)
    scheduler, now = engine.scheduler, clock.now()
    num_live, budget = scheduler._num_live(now), scheduler._free_units_for_plan()
    time = scheduler._step_time(now)
    candidates = waiting_candidates(scheduler.waiting, now, 50, budget, apt_scheduler.VIOLATOR_WEIGHT,
                                    lambda bucket: scheduler._shape_price(bucket, num_live, time))
    ranked = []  # brute force: every waiting request priced, ranked as the greedy's walk ranks first steps
    for order, request in enumerate(scheduler.waiting):
        item = scheduler._waiting_item(request, now, num_live, time)
        gain = first_gain(*options(item.kv_units, item.kv_value, item.hidden_units, item.hidden_value, budget))
        if gain is not None:
            ranked.append((-gain, order, request))
    top = sorted(ranked, key=lambda entry: entry[:2])[:50]
    assert candidates == [request for _, _, request in sorted(top, key=lambda entry: entry[1])]
    assert num_live == sum(not r.is_past_slo(now) for r in (*scheduler.waiting, *scheduler.running))


@pytest.mark.parametrize("policy", ["apt", "apt-chunked"])
@pytest.mark.parametrize("seed", [0, 1])
def test_decisions_unchanged_when_memory_binds(policy, seed):
    # 300 waiting, room for a few dozen: the greedy stops on memory well inside the candidates, so bounding them
    # changes nothing; short queues (<= MIN_CANDIDATES) price everyone, as before.
    engine, clock = long_queue_engine(policy, num_units=240, num_waiting=300, seed=seed)
    num_steps = num_long = 0
    while engine.has_unfinished_requests() and num_steps < 400:
        scheduler, now = engine.scheduler, clock.now()
        num_long += len(scheduler.waiting) > MIN_CANDIDATES
        assert scheduler._plan(now, scheduler._num_live(now), upgrades=True) == full_plan(scheduler, now)
        engine.step()
        scheduler.check_invariants()
        num_steps += 1
    assert num_long > 50 and num_steps > num_long
