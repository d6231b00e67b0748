"""Routing requests over engine replicas: what the router booked since a replica's last report, and the policies.

Pure (no Ray, no torch, no clock of its own): the Ray router and the cluster simulator call the same code. A replica
reports the ReplicaSnapshot its engine core takes (core/snapshot.py) every poll; between polls the Ledger adds what the router sent it, so a burst does not all
land on the replica that looked idle at the last poll.

Policies: `round-robin`; `least-load` (vLLM's data-parallel balancer: 4 x waiting + running); `pow2` (the less
loaded of two replicas drawn at random); `apt-slo`, which predicts the new request's TTFT and TBT on each replica from
the replica's own fitted step-cost model (the one its scheduler sizes chunks with) and its memory, counting the hidden
cache's recompute where only hidden rows would fit, and picks the most SLO slack (ties: the most free memory); with
`shed`, it refuses a request no replica can serve within its SLOs.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from aptserve.cache.geometry import KV_UNITS_PER_BLOCK, cdiv
from aptserve.core.snapshot import ReplicaSnapshot

ROUTERS = ("apt-slo", "least-load", "pow2", "round-robin")
SHED_ERROR = "shed by the router: no replica can meet the request's SLOs"


@dataclass(frozen=True)
class RouteRequest:
    prompt_len: int
    max_tokens: int
    ttft_slo_s: float
    tbt_slo_s: float


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    tbt_s: float

    def slack(self, request: RouteRequest) -> float:
        """The tighter of the two SLO margins, as a share of its SLO (negative: predicted to miss)."""
        return min(1 - self.ttft_s / request.ttft_slo_s, 1 - self.tbt_s / request.tbt_slo_s)


def predict(replica: ReplicaSnapshot, request: RouteRequest) -> Prediction:
    """The request's TTFT and TBT on `replica`: the queued prompts ahead of it and its own go through chunked steps
    next to the running decodes; its whole life must fit the free units, as KV or else (hybrid cache on) as hidden
    rows whose K/V every step re-projects; if neither fits it waits for memory (TTFT infinite here)."""
    cost, decodes, prefill_per_step = replica.step_cost, replica.num_running, replica.prefill_tokens_per_step
    queued = replica.waiting_tokens + request.prompt_len
    chunk = min(prefill_per_step, queued)
    step_s = cost.predict(decodes + chunk, replica.running_context_tokens + chunk * (chunk + 1) / 2)
    ttft_s = math.ceil(queued / prefill_per_step) * step_s
    num_blocks = cdiv(request.prompt_len + request.max_tokens, replica.block_size)
    recompute_s = 0.0
    if num_blocks * KV_UNITS_PER_BLOCK > replica.free_units:
        if 0 < num_blocks * replica.units_per_hidden_block <= replica.free_units:
            recompute_s = replica.alpha_s * num_blocks
        else:
            ttft_s = math.inf
    # A later step: one more decode row and its context, beside the next chunk of whatever is queued.
    next_chunk = min(prefill_per_step, replica.waiting_tokens)
    tbt_s = cost.predict(decodes + 1 + next_chunk, replica.running_context_tokens + request.prompt_len
                         + next_chunk * (next_chunk + 1) / 2) + recompute_s
    return Prediction(ttft_s, tbt_s)


class Ledger:
    """Requests routed to each replica since its last snapshot, added to that snapshot until the next poll (which
    sees them on the replica) clears them, or until they finish before it (then no poll will ever show them)."""

    def __init__(self) -> None:
        self._booked: dict[str, dict[str, RouteRequest]] = {}

    def book(self, replica_id: str, request_id: str, request: RouteRequest) -> None:
        self._booked.setdefault(replica_id, {})[request_id] = request

    def finished(self, replica_id: str, request_id: str) -> None:
        self._booked.get(replica_id, {}).pop(request_id, None)

    def polled(self, replica_id: str) -> None:
        """A fresh snapshot of `replica_id` arrived: what was booked before it is in it."""
        self._booked.pop(replica_id, None)

    def view(self, snapshot: ReplicaSnapshot) -> ReplicaSnapshot:
        """The snapshot with what was booked since: queued prompts, waiting requests, their units reserved as KV."""
        booked = list(self._booked.get(snapshot.replica_id, {}).values())
        if not booked:
            return snapshot
        units = sum(cdiv(r.prompt_len + r.max_tokens, snapshot.block_size) * KV_UNITS_PER_BLOCK for r in booked)
        return dataclasses.replace(snapshot, num_waiting=snapshot.num_waiting + len(booked),
                                   waiting_tokens=snapshot.waiting_tokens + sum(r.prompt_len for r in booked),
                                   free_units=max(0, snapshot.free_units - units))


class RoutingPolicy(Protocol):
    def choose(self, replicas: Sequence[ReplicaSnapshot], request: RouteRequest) -> str | None:
        """The replica id to send `request` to (`replicas`: the ledger's views), or None to refuse it."""


def load_score(replica: ReplicaSnapshot) -> int:
    """vLLM's data-parallel balancer: waiting requests weigh four times a running one."""
    return 4 * replica.num_waiting + replica.num_running


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, replicas: Sequence[ReplicaSnapshot], request: RouteRequest) -> str | None:
        chosen = replicas[self._next % len(replicas)]
        self._next += 1
        return chosen.replica_id


class LeastLoad:
    def choose(self, replicas: Sequence[ReplicaSnapshot], request: RouteRequest) -> str | None:
        return min(replicas, key=load_score).replica_id


class PowerOfTwo:
    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, replicas: Sequence[ReplicaSnapshot], request: RouteRequest) -> str | None:
        pair = self._rng.sample(list(replicas), min(2, len(replicas)))
        return min(pair, key=load_score).replica_id


def priced_alike(replicas: Sequence[ReplicaSnapshot]) -> Sequence[ReplicaSnapshot]:
    """Replicas whose step cost is still the generic prior priced by a fitted one's model instead (replicas of one
    deployment run the same model on the same hardware): the prior is several times off either way, and a busy
    replica that had not refit yet looked three times faster than an idle one that had."""
    fitted = next((r.step_cost for r in replicas if r.step_cost_fitted), None)
    if fitted is None:
        return replicas
    return [r if r.step_cost_fitted else dataclasses.replace(r, step_cost=fitted) for r in replicas]


# Slacks within this share of the SLO are a tie: each replica predicts with its own fitted step cost, and two fits
# of the same machine differ by more than one decode row of a small model costs (a busy replica could look faster).
SLACK_TIE = 0.02


class AptSlo:
    def __init__(self, shed: bool = False) -> None:
        self.shed = shed

    def choose(self, replicas: Sequence[ReplicaSnapshot], request: RouteRequest) -> str | None:
        replicas = priced_alike(replicas)
        slacks = [predict(r, request).slack(request) for r in replicas]
        best = max(slacks)
        if self.shed and best < 0:
            return None
        # Ties (all idle, all predicted to wait for memory, or within SLACK_TIE) go to the lightest load, then the
        # most free memory (cached prefixes count as used, so memory alone can favour a busy replica), then the first.
        _, _, chosen = max((-load_score(r), r.free_units, -i) for i, r in enumerate(replicas)
                           if slacks[i] >= best - SLACK_TIE)
        return replicas[-chosen].replica_id


def make_policy(name: str, seed: int = 0, shed: bool = False) -> RoutingPolicy:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}: use one of {', '.join(ROUTERS)}")
    if shed and name != "apt-slo":
        raise ValueError("only the apt-slo router predicts SLO misses, so only it can shed")
    return {"apt-slo": lambda: AptSlo(shed), "least-load": LeastLoad, "pow2": lambda: PowerOfTwo(seed),
            "round-robin": RoundRobin}[name]()
