"""Hybrid cache on the pure side: all-hidden admission, conversions in the plan, nothing leaked."""
import pytest

from aptserve.cache import CacheKind
from aptserve.cache.geometry import hidden_units_per_block
from aptserve.cache.tables import CACHE_OWNER
from aptserve.config import HybridMode, ModelConfig
from aptserve.engine_args import resolve_hybrid_cache
from aptserve.errors import InvalidRequestError
from aptserve.sampling import SamplingParams
from aptserve.sched import policy_class
from aptserve.sim.executor import CostModelExecutor
from aptserve.sim.simulator import sim_engine
from tests.sim_fixtures import sim_args

# 16 layers: the recompute scratch (one layer's K/V of a 512-token context) is 16 pool units, small beside the pools
# here, as it is beside a real model's.
MHA = ModelConfig(path="sim", architecture="opt", num_layers=16, hidden_size=64, num_heads=4, num_kv_heads=4,
                  head_dim=16, vocab_size=1000, max_model_len=512)
GQA = ModelConfig(path="sim", architecture="llama", num_layers=2, hidden_size=576, num_heads=9,
                  num_kv_heads=3, head_dim=64, vocab_size=1000, max_model_len=512)


class RecordingExecutor(CostModelExecutor):
    def __init__(self, clock, cost_model):
        super().__init__(clock, cost_model)
        self.outputs = []

    def execute(self, sched_out):
        self.outputs.append(sched_out)
        return super().execute(sched_out)


def make_engine(hybrid: str, num_units: int = 200, policy: str = "fcfs", **flags):
    args = sim_args(MHA, num_units, block_size=4, hybrid_cache=hybrid, scheduler=policy, max_num_batched_tokens=256,
                    **flags)
    engine, _ = sim_engine(args, MHA, make_executor=RecordingExecutor)
    assert engine.cache.num_units - engine.cache.num_scratch_units == num_units  # left while the scratch is lent
    return engine, engine.executor


def drain(engine):
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        engine.scheduler.check_invariants()
    return finished


def test_auto_turns_hidden_on_for_mha_and_off_for_gqa():
    apt, fcfs = policy_class("apt"), policy_class("fcfs")
    assert resolve_hybrid_cache(HybridMode.AUTO, MHA, apt) == "on"
    assert resolve_hybrid_cache(HybridMode.AUTO, GQA, apt) == "off"
    assert resolve_hybrid_cache(HybridMode.OFF, MHA, apt) == "off"
    # A policy that never chooses HIDDEN: no scratch, and contexts sized by the KV kind it admits; on by hand only.
    assert resolve_hybrid_cache(HybridMode.AUTO, MHA, fcfs) == "off"
    assert resolve_hybrid_cache(HybridMode.ON, MHA, fcfs) == "on"
    assert hidden_units_per_block(MHA.hidden_size, MHA.kv_dim) == 1
    assert hidden_units_per_block(GQA.hidden_size, GQA.kv_dim) == 3


def test_all_hidden_doubles_the_tokens_the_pool_holds_on_mha():
    engine, _ = make_engine("all-hidden", num_units=40)
    # The 40 units (besides the scratch's) hold 80 tokens as KV, 160 as hidden rows.
    assert (engine.cache.num_units - engine.cache.num_scratch_units == engine.cache.num_units_for(CacheKind.KV, 80)
            == engine.cache.num_units_for(CacheKind.HIDDEN, 160) == 40)
    for i in range(4):  # 4 x 40 tokens = 160 tokens: twice what 40 units hold as KV
        engine.add_request(list(range(3, 39)), SamplingParams(max_tokens=4), request_id=f"r{i}")
    engine.step()
    assert engine.scheduler.num_running == 4
    assert engine.cache.usage()["hidden"] == 4 * 9 and engine.cache.usage()["kv"] == 0
    assert engine.cache.usage()["scratch"] == engine.cache.num_scratch_units > 0
    assert len(drain(engine)) == 4
    assert engine.cache.num_free_units == engine.cache.num_units  # the scratch too, with the last hidden table


@pytest.mark.parametrize("policy", ["fcfs", "chunked"])
def test_auto_under_a_policy_that_never_chooses_hidden_sizes_contexts_by_what_it_admits(policy):
    """Capped by what 40 units hold as hidden rows (160 tokens), a 150-token request fit, and fcfs, which admits
    only KV, stepped forever without admitting it."""
    engine, _ = make_engine("auto", num_units=40, policy=policy)
    assert engine.hybrid_cache == "off" and engine.config.model.max_model_len == 80  # 40 units as KV
    engine.add_request(list(range(3, 73)), SamplingParams(max_tokens=8), request_id="long")
    assert len(drain(engine)) == 1 and engine.cache.num_free_units == 40


@pytest.mark.parametrize("policy", ["fcfs", "chunked"])
def test_hidden_to_kv_by_projection_then_kv_to_hidden_by_solving_back_both_in_place(policy):
    engine, executor = make_engine("on", policy=policy, preemption_mode="hidden")
    engine.add_request(list(range(3, 20)), SamplingParams(max_tokens=12), request_id="a")
    engine.convert_request("a", CacheKind.HIDDEN)  # before admission: simply admitted as HIDDEN
    for _ in range(3):
        engine.step()
    assert engine.cache.kind_of("a") == CacheKind.HIDDEN
    engine.convert_request("a", CacheKind.KV)
    engine.step()
    conversion = executor.outputs[-1].conversions[0]
    assert (conversion.src_kind, conversion.dst_kind) == (CacheKind.HIDDEN, CacheKind.KV)
    assert conversion.num_tokens == 17 + 2 and len(conversion.dst_unit_ids) == 2 * 5
    assert engine.cache.kind_of("a") == CacheKind.KV
    engine.convert_request("a", CacheKind.HIDDEN)  # MHA: K/V determine the hidden rows, nothing is re-prefilled
    engine.step()
    demotion = executor.outputs[-1].conversions[0]
    assert (demotion.src_kind, demotion.dst_kind, demotion.num_tokens) == (CacheKind.KV, CacheKind.HIDDEN, 17 + 3)
    # Its full K/V blocks are in the prefix cache (others may read them): their hidden rows take new units.
    assert len(demotion.dst_unit_ids) == 5
    assert all(engine.cache.pool.owner_of(unit) == CACHE_OWNER for unit in demotion.src_unit_ids)
    assert not executor.outputs[-1].preempted_request_ids
    assert [(r.cache_kind, r.num_tokens) for r in executor.outputs[-1].scheduled] == [(CacheKind.HIDDEN, 1)]
    output = drain(engine)["a"]
    assert len(output.outputs[0].token_ids) == 12 and output.metrics.num_conversions == 2
    assert engine.cache.num_free_units == engine.cache.num_units


def test_conversion_waits_until_memory_allows():
    engine, executor = make_engine("all-hidden", num_units=12)
    engine.add_request(list(range(3, 30)), SamplingParams(max_tokens=4), request_id="a")  # 7 hidden units
    engine.step()
    engine.convert_request("a", CacheKind.KV)  # needs 14 KV units while holding 7: cannot
    engine.step()
    assert not executor.outputs[-1].conversions and engine.cache.kind_of("a") == CacheKind.HIDDEN
    assert len(drain(engine)) == 1


@pytest.mark.parametrize("policy", ["apt", "apt-chunked"])
def test_apt_policies_use_hidden_under_pressure_and_lose_nothing(policy):
    import numpy as np

    engine, executor = make_engine("on", num_units=60, policy=policy)
    engine.scheduler.alpha_s = 1e-5
    rng = np.random.default_rng(0)
    for i in range(30):  # each has waited a little, so each has value: at the first step all 30 are priced
        prompt_len, max_tokens = map(int, rng.integers(4, 40, size=2))
        engine.add_request(list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens),
                           request_id=f"r{i}", arrival_s=-0.01 * (i + 1))
    hidden_steps = 0
    finished = {}
    for _ in range(5000):
        if not engine.has_unfinished_requests():
            break
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        engine.scheduler.check_invariants()
        hidden_steps += any(s.cache_kind == CacheKind.HIDDEN for s in executor.outputs[-1].scheduled)
    assert len(finished) == 30
    assert hidden_steps > 0, "with a tight pool and cheap recompute the greedy should pick HIDDEN"
    admissions = engine.core.stats().admissions
    assert admissions["hidden"] > 0 and admissions["hidden"] + admissions["kv"] >= 30
    assert engine.cache.num_free_units == engine.cache.num_units


@pytest.mark.parametrize("policy", ["apt", "apt-chunked"])
def test_hidden_rows_are_never_chosen_where_their_recompute_breaks_running_requests_tbt(policy, monkeypatch):
    """Four requests decode under a 0.1 s TBT SLO when long prompts that have waited 5 s arrive into a pool where
    two fit only as hidden rows: each hidden one would add 0.2 s of K/V re-projection to every step. Priced by value
    alone (the step-time check turned off) the greedy takes them hidden and the decoding requests miss their P99
    TBT; batch-aware, it admits them as KV when memory allows and none misses."""
    import numpy as np

    from aptserve.sched import apt_scheduler
    from aptserve.sim.executor import LinearCostModel

    cost = LinearCostModel(base_s=0.01, per_token_s=0.0005, per_context_token_s=0.0, per_recompute_token_s=0.001)
    results = {}
    for batch_aware in (False, True):
        if not batch_aware:
            monkeypatch.setattr(apt_scheduler.AptScheduler, "_step_time",
                                lambda self, now: apt_scheduler.NO_HIDDEN_TIME_LIMIT)
        else:
            monkeypatch.undo()
        args = sim_args(MHA, 160, block_size=4, hybrid_cache="on", scheduler=policy, max_num_batched_tokens=256,
                        alpha=cost.alpha_s(MHA, 4, "float32", "cpu"), tbt_slo=0.1, ttft_slo=50.0)
        engine, clock = sim_engine(args, MHA, cost, make_executor=RecordingExecutor)
        decoding = [engine.add_request(list(range(3, 13)), SamplingParams(max_tokens=30, ignore_eos=True)).request_id
                    for _ in range(4)]
        finished = {}
        for _ in range(10):
            finished.update({o.request_id: o for o in engine.step() if o.finished})
        for i in range(3):
            engine.add_request(list(range(3, 203)), SamplingParams(max_tokens=4, ignore_eos=True),
                               arrival_s=clock.now() - 5.0)
        finished.update(drain(engine))
        assert len(finished) == 7 and engine.cache.num_free_units == engine.cache.num_units
        hidden = sum(s.cache_kind == CacheKind.HIDDEN for out in engine.executor.outputs for s in out.scheduled)
        worst_p99 = max(float(np.percentile(np.diff(finished[r].metrics.token_times_s), 99)) for r in decoding)
        results[batch_aware] = hidden, worst_p99
    assert results[False][0] > 0 and results[False][1] > 0.1, results
    assert results[True][1] <= 0.1, results


@pytest.mark.parametrize("policy", ["apt", "apt-chunked"])
def test_hybrid_cache_that_admits_nothing_hidden_schedules_exactly_as_kv_only_on_the_same_bytes(policy):
    """The scratch borrows pool units only while hidden rows are held, so where the greedy never finds hidden rows
    worth it (here, recompute priced at a second per block) the hybrid engine is the KV-only engine on the same
    bytes, step for step. With the scratch kept out of the pool, its smaller pool preempted differently."""
    import dataclasses

    import numpy as np

    rng = np.random.default_rng(1)
    trace = [tuple(map(int, rng.integers(4, 60, size=2))) for _ in range(40)]
    steps = {}
    for hybrid in ("off", "on"):
        args = dataclasses.replace(sim_args(MHA, 80, block_size=4, scheduler=policy, max_num_batched_tokens=64),
                                   hybrid_cache=hybrid, alpha=1.0)
        engine, _ = sim_engine(args, MHA, make_executor=RecordingExecutor)
        for i, (prompt_len, max_tokens) in enumerate(trace):
            engine.add_request(list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                               request_id=f"r{i}", arrival_s=-0.01 * (i + 1))
        assert len(drain(engine)) == len(trace)
        assert engine.cache.num_units == 80 and engine.scheduler.num_preemptions > 0  # memory binds
        assert engine.core.stats().admissions["hidden"] == 0
        steps[hybrid] = [[(s.request_id, s.start_pos, s.num_tokens) for s in out.scheduled]
                         for out in engine.executor.outputs]
    assert steps["on"] == steps["off"]


@pytest.mark.parametrize("policy", ["apt-chunked", "fcfs"])
def test_with_the_hybrid_cache_on_a_request_must_fit_the_pool_as_kv(policy):
    """Whether a request runs as hidden rows is the policy's choice at each step: here (alpha a second a block) the
    apt greedy never offers them and fcfs never chooses them. A request the pool could hold only as hidden rows
    used to be accepted and wait forever (the simulator's loop never drained); now the context is capped to what
    fits as KV and such a request is refused at the door. All-hidden engines are sized by hidden rows."""
    engine, _ = make_engine("on", num_units=40, policy=policy, alpha=1.0)
    pool = engine.cache
    as_kv, as_hidden = pool.num_units // 2 * 4, (pool.num_units - pool.num_scratch_units) * 4  # 4-token blocks
    assert engine.config.model.max_model_len == as_kv == 112 and as_hidden == 160
    with pytest.raises(InvalidRequestError, match="maximum context length is 112 tokens"):
        engine.add_request(list(range(3, 153)), SamplingParams(max_tokens=4))  # 150 tokens: fit as hidden rows only
    engine.add_request(list(range(3, 100)), SamplingParams(max_tokens=12, ignore_eos=True), request_id="longest")
    engine.add_request(list(range(3, 20)), SamplingParams(max_tokens=4), request_id="short")
    assert set(drain(engine)) == {"longest", "short"}
    assert pool.num_free_units == pool.num_units
    hidden, _ = make_engine("all-hidden", num_units=40, policy=policy)
    pool = hidden.cache
    assert hidden.config.model.max_model_len == (pool.num_units - pool.num_scratch_units) * 4 > pool.num_units // 2 * 4
