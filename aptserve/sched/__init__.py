"""Scheduling policies behind one interface; pure Python (no tensors, no wall clock)."""
from aptserve.sched.base import Scheduler
from aptserve.sched.output import RunnerOutput, ScheduledRequest, SchedulerOutput

__all__ = ["Scheduler", "SchedulerOutput", "ScheduledRequest", "RunnerOutput", "create_scheduler"]


def create_scheduler(policy: str, *args, **kwargs) -> Scheduler:
    """The scheduler class for a `--scheduler` name."""
    from aptserve.sched.apt_scheduler import AptChunkedScheduler, AptScheduler
    from aptserve.sched.chunked import ChunkedScheduler
    from aptserve.sched.fcfs import FcfsScheduler

    policies: dict[str, type[Scheduler]] = {"fcfs": FcfsScheduler, "chunked": ChunkedScheduler,
                                            "apt": AptScheduler, "apt-chunked": AptChunkedScheduler}
    if policy not in policies:
        raise ValueError(f"scheduler {policy!r} is not available; choose one of {sorted(policies)}")
    return policies[policy](*args, **kwargs)
