"""SimClock and CostModelExecutor: the simulator's Clock and Executor.

The executor returns synthetic tokens (never EOS unless asked) and the step time a linear cost model
predicts; with the SimClock it lets the real engine.step() run without a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from aptserve.sched.output import RunnerOutput, SchedulerOutput


class SimClock:
    def __init__(self, start_s: float = 0.0) -> None:
        self.time_s = start_s

    def now(self) -> float:
        return self.time_s

    def advance(self, seconds: float) -> None:
        self.time_s += seconds


@dataclass(frozen=True)
class LinearCostModel:
    """step time = base + per_token * tokens fed + per_context_token * tokens attended
    + per_recompute_token * context tokens whose K/V are re-projected from hidden rows (and rows converted)."""

    base_s: float = 0.005
    per_token_s: float = 0.0002
    per_context_token_s: float = 0.000002
    per_recompute_token_s: float = 0.00002

    def alpha_s(self, model_config, block_size: int, dtype: str, device: str) -> float:
        """The hidden cache's price in this model: seconds to re-project one block (the scheduler's alpha)."""
        return self.per_recompute_token_s * block_size

    def step_time(self, sched_out: SchedulerOutput) -> float:
        return self.step_time_of(sched_out.cost_features())

    def step_time_of(self, features: list[float]) -> float:
        """Seconds for a step with these features (SchedulerOutput.cost_features)."""
        return (self.base_s * features[0] + self.per_token_s * features[1] + self.per_context_token_s * features[2]
                + self.per_recompute_token_s * features[3])


class CostModel(Protocol):
    """What the simulator needs of a cost model (LinearCostModel here, RooflineCostModel in roofline.py)."""

    def step_time(self, sched_out: SchedulerOutput) -> float: ...

    def alpha_s(self, model_config, block_size: int, dtype: str, device: str) -> float: ...


class CostModelExecutor:
    """`step_overhead_s`: what a served step costs beyond the forward pass (scheduling, the engine loop's update,
    the front end's turn between steps), added to every step the cost model prices. `step_time_scale`: how much
    slower the forward pass runs served than where the cost model was fitted (the server's own processes share the
    cores), multiplying every priced step. `priced_s` sums the cost model's own (unscaled) figures."""

    def __init__(self, clock: SimClock | None = None, cost_model: CostModel | None = None,
                 token_id: int = 7, step_overhead_s: float = 0.0, step_time_scale: float = 1.0) -> None:
        self.clock = clock
        self.cost_model = cost_model or LinearCostModel()
        self.token_id = token_id
        self.step_overhead_s, self.step_time_scale = step_overhead_s, step_time_scale
        self.num_steps, self.priced_s = 0, 0.0

    def execute(self, sched_out: SchedulerOutput) -> RunnerOutput:
        elapsed_s = 0.0
        if sched_out.scheduled:
            priced_s = self.cost_model.step_time(sched_out)
            self.priced_s += priced_s
            elapsed_s = self.step_time_scale * priced_s + self.step_overhead_s
        if self.clock is not None:
            self.clock.advance(elapsed_s)
        self.num_steps += 1
        sampled = {r.request_id: self.token_id for r in sched_out.scheduled if r.sample}
        return RunnerOutput(sampled_token_ids=sampled, forward_s=elapsed_s)
