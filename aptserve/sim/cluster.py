"""Replay a trace over N simulated engine replicas behind a routing policy (aptserve/cluster/policy.py, the same
code the Ray router runs).

Each replica is the real engine on a simulated clock of its own. Events are taken in time order: the replica whose
clock is earliest steps while that is before the next arrival; an arrival is routed on the replicas' snapshots as
the router last polled them (every `staleness_s`; 0: fresh at every arrival), plus what it booked since.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from aptserve.bench.datasets import TraceRequest
from aptserve.bench.metrics import RequestRecord
from aptserve.cluster.policy import SHED_ERROR, Ledger, RouteRequest, RoutingPolicy
from aptserve.core.snapshot import ReplicaSnapshot
from aptserve.engine import LLMEngine
from aptserve.sim.executor import SimClock
from aptserve.sim.simulator import add_trace_request, trace_record


def simulate_cluster(replicas: Sequence[tuple[LLMEngine, SimClock]], policy: RoutingPolicy,
                     trace: Sequence[TraceRequest], send_offsets_s: Sequence[float],
                     route_request: Callable[[TraceRequest], RouteRequest], staleness_s: float = 0.0,
                     request_latency_s: float = 0.0, progress=None) -> tuple[list[RequestRecord], list[int]]:
    """Every request of the trace to completion (or shed); its records in trace order and how many requests each
    replica was sent."""
    records: dict[int, RequestRecord] = {}
    names = [str(i) for i in range(len(replicas))]
    snapshots: dict[str, ReplicaSnapshot] = {}
    ledger, sent = Ledger(), [0] * len(replicas)
    next_index = 0
    while next_index < len(trace) or any(engine.has_unfinished_requests() for engine, _ in replicas):
        arrival_s = send_offsets_s[next_index] if next_index < len(trace) else float("inf")
        busy = [(clock.now(), i) for i, (engine, clock) in enumerate(replicas) if engine.has_unfinished_requests()]
        if busy and min(busy)[0] <= arrival_s:
            replica = min(busy)[1]
            engine, clock = replicas[replica]
            for output in engine.step():
                if output.finished:
                    ledger.finished(names[replica], output.request_id)
                    index = int(output.request_id)
                    records[index] = trace_record(output, trace[index], request_latency_s)
                    if progress is not None:
                        progress.update(1)
            continue
        for i, (engine, clock) in enumerate(replicas):  # the poll: snapshots at most staleness_s old
            if names[i] not in snapshots or arrival_s - snapshots[names[i]].taken_s >= staleness_s:
                snapshots[names[i]] = engine.core.snapshot(names[i], arrival_s)
                ledger.polled(names[i])
        request = route_request(trace[next_index])
        chosen = policy.choose([ledger.view(snapshots[name]) for name in names], request)
        if chosen is None:
            records[next_index] = RequestRecord(ok=False, prompt_len=trace[next_index].prompt_len, output_len=0,
                                                send_s=arrival_s, error=SHED_ERROR)
        else:
            engine, clock = replicas[int(chosen)]
            clock.time_s = max(clock.time_s, arrival_s)  # an idle replica wakes at the arrival
            add_trace_request(engine, trace[next_index], next_index, arrival_s, records)
            ledger.book(chosen, str(next_index), request)
            sent[int(chosen)] += 1
        next_index += 1
    return [records[i] for i in range(len(trace))], sent
