"""Scheduling policies behind one interface; pure Python (no tensors, no wall clock).

A policy is one module here with a Scheduler subclass that sets `name` (and its traits); importing this package
imports every module in it, which registers each such class in POLICIES.
"""
import importlib
import pkgutil

from aptserve.config import EngineConfig
from aptserve.sched.base import POLICIES, Scheduler
from aptserve.sched.output import RunnerOutput, ScheduledRequest, SchedulerOutput

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["POLICIES", "Scheduler", "SchedulerOutput", "ScheduledRequest", "RunnerOutput", "create_scheduler",
           "policy_class"]


def policy_class(name: str) -> type[Scheduler]:
    """The policy called `name`; ValueError naming the known ones otherwise."""
    if name not in POLICIES:
        raise ValueError(f"scheduler must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name]


def create_scheduler(config: EngineConfig) -> Scheduler:
    """The policy `config.scheduler.policy` names, over a pool sized by `config.cache`."""
    return policy_class(config.scheduler.policy)(config)
