"""What an engine core publishes about itself for a router: a ReplicaSnapshot of its queues, free memory and
fitted step cost, read off its scheduler when it is polled (never every step).

Pure (the scheduler's own state and the step-cost model the core fitted): the Ray replica, the cluster simulator
and the routing policies (cluster/policy.py) all read this one type.
"""
from __future__ import annotations

from dataclasses import dataclass

from aptserve.config import EngineConfig, HybridMode
from aptserve.sched.base import Scheduler
from aptserve.sched.step_cost import StepCostModel


@dataclass(frozen=True)
class ReplicaSnapshot:
    replica_id: str
    taken_s: float  # when the replica reported it (the router's clock)
    num_running: int
    num_waiting: int
    waiting_tokens: int  # prompt tokens queued and not yet computed
    running_context_tokens: int  # tokens one decode step of every running request attends to
    free_units: int
    total_units: int
    block_size: int
    units_per_hidden_block: int  # 0 when the replica's hybrid cache is off
    max_step_tokens: int  # tokens per step (the prompt-chunk budget with the decodes)
    step_cost: StepCostModel = StepCostModel()
    alpha_s: float = 0.0  # seconds per step to re-project one block held as hidden rows
    step_cost_fitted: bool = False  # False: step_cost is still the prior, fitted to no step of this replica

    @property
    def prefill_tokens_per_step(self) -> int:
        """Prompt tokens a step has room for beside one decode token per running request."""
        return max(1, self.max_step_tokens - self.num_running)


def take_snapshot(scheduler: Scheduler, config: EngineConfig, replica_id: str = "",
                  taken_s: float = 0.0, step_cost_fitted: bool = False) -> ReplicaSnapshot:
    """The scheduler's state now; the hidden cache's figures only where its policy may choose hidden rows."""
    hybrid = config.cache.hybrid == HybridMode.ON and scheduler.prices_hidden_cache
    return ReplicaSnapshot(
        replica_id=replica_id, taken_s=taken_s, num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        waiting_tokens=sum(r.num_tokens - r.num_computed_tokens for r in scheduler.waiting),
        running_context_tokens=sum(r.num_tokens for r in scheduler.running),
        free_units=scheduler.cache.num_free_units, total_units=scheduler.cache.num_units,
        block_size=config.cache.block_size, units_per_hidden_block=config.cache.units_per_hidden_block if hybrid else 0,
        max_step_tokens=config.scheduler.max_num_batched_tokens, step_cost=scheduler.step_cost,
        alpha_s=config.scheduler.alpha_s if hybrid else 0.0, step_cost_fitted=step_cost_fitted)
