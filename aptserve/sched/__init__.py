"""Scheduling policies behind one interface; pure Python (no tensors, no wall clock)."""
from aptserve.config import EngineConfig, SchedulerPolicy
from aptserve.sched.apt_scheduler import AptChunkedScheduler, AptScheduler
from aptserve.sched.base import Scheduler
from aptserve.sched.chunked import ChunkedScheduler
from aptserve.sched.fcfs import FcfsScheduler
from aptserve.sched.output import RunnerOutput, ScheduledRequest, SchedulerOutput

__all__ = ["Scheduler", "SchedulerOutput", "ScheduledRequest", "RunnerOutput", "create_scheduler"]

POLICIES: dict[SchedulerPolicy, type[Scheduler]] = {
    SchedulerPolicy.FCFS: FcfsScheduler, SchedulerPolicy.CHUNKED: ChunkedScheduler,
    SchedulerPolicy.APT: AptScheduler, SchedulerPolicy.APT_CHUNKED: AptChunkedScheduler,
}


def create_scheduler(config: EngineConfig) -> Scheduler:
    """The policy `config.scheduler.policy` names, over a pool sized by `config.cache`."""
    return POLICIES[config.scheduler.policy](config)
