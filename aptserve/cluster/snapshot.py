"""What a replica reports to the router: a ReplicaSnapshot read off its scheduler (pure: the scheduler's own state
and the step-cost model its engine core fitted), for the Ray replica and the cluster simulator alike."""
from __future__ import annotations

from aptserve.cluster.policy import ReplicaSnapshot
from aptserve.config import EngineConfig, HybridMode
from aptserve.sched.base import Scheduler


def replica_snapshot(scheduler: Scheduler, config: EngineConfig, replica_id: str, now_s: float) -> ReplicaSnapshot:
    hybrid = config.cache.hybrid == HybridMode.ON and config.scheduler.policy.is_apt
    return ReplicaSnapshot(
        replica_id=replica_id, taken_s=now_s, num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        waiting_tokens=sum(r.num_tokens - r.num_computed_tokens for r in scheduler.waiting),
        running_context_tokens=sum(r.num_tokens for r in scheduler.running),
        free_units=scheduler.cache.num_free_units, total_units=scheduler.cache.num_units,
        block_size=config.cache.block_size, units_per_hidden_block=config.cache.units_per_hidden_block if hybrid else 0,
        max_step_tokens=config.scheduler.max_num_batched_tokens, step_cost=scheduler.step_cost,
        alpha_s=config.scheduler.alpha_s if hybrid else 0.0)
