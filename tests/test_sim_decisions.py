"""The simulator takes the scheduling decisions the real engine takes: a trace is served by the real engine (a
tiny llama on the real runner, on a clock advanced by a fixed price of each step), its step times are recorded,
and the simulator replays the trace with those times as its cost model. Every step must schedule the same
requests, with the same token counts, positions, cache kinds, preemptions and conversions: the policies,
the pool and the engine step are the same code, and nothing in the simulator's driver changes what they see."""
from __future__ import annotations

import pytest

from aptserve.bench.datasets import TraceRequest
from aptserve.cache.tables import CacheKind
from aptserve.core.engine_core import build_engine_core
from aptserve.engine import LLMEngine
from aptserve.engine_args import EngineArgs
from aptserve.runner import ModelRunner
from aptserve.sched.output import SchedulerOutput
from aptserve.sim.executor import CostModelExecutor, LinearCostModel, SimClock
from aptserve.sim.simulator import sim_engine, simulate
from tests.model_fixtures import save_tiny_llama

TRACE = [TraceRequest("", 20 + 7 * (i % 6), 8 + 5 * (i % 4)) for i in range(14)]
OFFSETS_S = [0.004 * i for i in range(len(TRACE))]
STEP_PRICE = LinearCostModel(base_s=0.003, per_token_s=0.0001, per_context_token_s=1e-6, per_recompute_token_s=1e-5)


def decision(sched_out: SchedulerOutput) -> tuple:
    return (tuple((r.request_id, r.num_tokens, r.start_pos, r.cache_kind, r.sample) for r in sched_out.scheduled),
            tuple(sorted(sched_out.preempted_request_ids)),
            tuple((c.request_id, c.num_tokens, c.src_kind, c.dst_kind) for c in sched_out.conversions))


class TimedRunner:
    """The real runner on a simulated clock that advances by a fixed price of each step, and reports that price as its
    time (a measured time would make the decisions, and this test's preconditions, depend on the machine's load)."""

    def __init__(self, runner: ModelRunner, clock: SimClock) -> None:
        self.runner, self.clock = runner, clock
        self.decisions, self.step_times_s = [], []

    def execute(self, sched_out: SchedulerOutput):
        out = self.runner.execute(sched_out)
        elapsed_s = STEP_PRICE.step_time(sched_out) if sched_out.scheduled else 0.0
        self.clock.advance(elapsed_s)
        # The engine learns its step-cost model from the phases the executor reports: the price, as the
        # simulator's executor reports it (the measured ones would make chunk sizes depend on the machine).
        out.prepare_s, out.forward_s, out.sample_s = 0.0, elapsed_s, 0.0
        self.decisions.append(decision(sched_out))
        self.step_times_s.append(elapsed_s)
        return out


class ReplayedTimes:
    """A cost model that answers the recorded step times, in order."""

    def __init__(self, step_times_s: list[float]) -> None:
        self.step_times_s = iter(step_times_s)

    def step_time(self, sched_out: SchedulerOutput) -> float:
        return next(self.step_times_s)

    def alpha_s(self, model_config, block_size: int, dtype: str, device: str) -> float:
        raise AssertionError("alpha is given explicitly")


class RecordingSimExecutor(CostModelExecutor):
    def __init__(self, clock, cost_model) -> None:
        super().__init__(clock, cost_model)
        self.decisions = []

    def execute(self, sched_out: SchedulerOutput):
        self.decisions.append(decision(sched_out))
        return super().execute(sched_out)


@pytest.mark.parametrize("policy", ["fcfs", "apt-chunked"])
def test_the_simulator_schedules_as_the_real_engine(tmp_path, policy):
    path = save_tiny_llama(tmp_path, num_kv_heads=4, tie_word_embeddings=False)  # MHA: the hybrid cache is on
    args = EngineArgs(model=path, max_model_len=128, block_size=4, kv_cache_memory=400_000, scheduler=policy,
                      max_num_seqs=6, max_num_batched_tokens=48, hidden_scratch_tokens=128, alpha=1e-6,
                      ttft_slo=0.05, tbt_slo=0.02)
    clock = SimClock()
    core = build_engine_core(args, make_executor=lambda config: TimedRunner(ModelRunner.from_config(config), clock),
                             clock=clock)
    config, real = core.config, core.executor
    real_records = simulate(LLMEngine(core), clock, TRACE, OFFSETS_S)
    assert all(r.ok for r in real_records)
    if policy == "apt-chunked":  # a tight pool and a cheap hidden cache: every kind of decision is taken
        assert any(d[1] for d in real.decisions) and any(d[2] for d in real.decisions)
        assert any(r[3] == CacheKind.HIDDEN for d in real.decisions for r in d[0])

    sim, sim_clock = sim_engine(args, config.model, ReplayedTimes(real.step_times_s),
                                make_executor=RecordingSimExecutor)
    assert sim.config == config
    sim_records = simulate(sim, sim_clock, TRACE, OFFSETS_S)
    assert sim.executor.decisions == real.decisions
    assert [r.token_times_s for r in sim_records] == [r.token_times_s for r in real_records]
