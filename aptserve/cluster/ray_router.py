"""The Serve RequestRouter that routes with aptserve.cluster.policy: the replicas' last reports (their
ReplicaSnapshots, each `request_routing_stats_period_s`) plus a ledger of what it sent each one since; with --shed
it refuses a request no replica can serve within its SLOs (RequestShedError, HTTP 503).

Serve pickles this module by value into every process that holds a handle: it keeps no state at module level.
"""
from __future__ import annotations

import dataclasses

import msgspec
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from aptserve.cluster.policy import SHED_ERROR, Ledger, RouteRequest, make_policy
from aptserve.core.messages import EngineStats
from aptserve.core.snapshot import ReplicaSnapshot
from aptserve.errors import RequestShedError


def route_request(pending_request: PendingRequest) -> RouteRequest:
    kwargs = pending_request.kwargs
    return RouteRequest(len(kwargs["prompt_token_ids"]), kwargs["params"].max_tokens, kwargs["ttft_slo_s"],
                        kwargs["tbt_slo_s"])


class PolicyRouter(RequestRouter):
    def initialize_state(self, router: str = "apt-slo", shed: bool = False, seed: int = 0) -> None:
        self.policy = make_policy(router, seed, shed)
        self.ledger = Ledger()
        self.replica_stats: dict[str, EngineStats] = {}  # each replica's last report
        self.replica_pids: dict[str, int] = {}
        self.num_routed: dict[str, int] = {}  # requests sent to each replica since start
        self._snapshots: dict[str, ReplicaSnapshot] = {}
        self._report_times: dict[str, float] = {}
        self._stats_decoder = msgspec.msgpack.Decoder(EngineStats)
        self._snapshot_decoder = msgspec.msgpack.Decoder(ReplicaSnapshot)
        # Serve copies this module into the handle's process by value; the registry must be the real module's.
        from aptserve.cluster import ingress

        ingress.live_routers.append(self)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        snapshots = [self._snapshot(replica) for replica in candidate_replicas]
        # Serve's own choice for calls other than a request, and until every replica has reported.
        if pending_request is None or pending_request.metadata.call_method != "generate" or None in snapshots:
            return [candidate_replicas]
        chosen_id = self.policy.choose([self.ledger.view(s) for s in snapshots], route_request(pending_request))
        if chosen_id is None:
            if not pending_request.future.done():
                pending_request.future.set_exception(RequestShedError(SHED_ERROR))
            return [candidate_replicas[:1]]  # Serve sees the request settled and stops routing it
        chosen = next(r for r in candidate_replicas if r.replica_id.unique_id == chosen_id)
        # If the chosen one is full (max_ongoing_requests), Serve tries the others, least queued first.
        return [[chosen], [r for r in candidate_replicas if r is not chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        if pending_request.metadata.call_method == "generate":
            self.ledger.book(replica_id.unique_id, pending_request.metadata.internal_request_id,
                             route_request(pending_request))
            self.num_routed[replica_id.unique_id] = self.num_routed.get(replica_id.unique_id, 0) + 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.ledger.finished(replica_id.unique_id, internal_request_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {replica.replica_id.unique_id for replica in replicas}
        for replica_id in set(self._snapshots) - live:
            self._forget(replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.unique_id)

    def _forget(self, replica_id: str) -> None:
        for table in (self.replica_stats, self.replica_pids, self._snapshots, self._report_times):
            table.pop(replica_id, None)
        self.ledger.polled(replica_id)

    def _snapshot(self, replica: RunningReplica) -> ReplicaSnapshot | None:
        """The replica's latest report; a newer one replaces what the ledger booked for it before. Serve can hand back
        an older report after a newer one (observed: a short request shown running again after its end was
        reported), so only a report taken later than the one held replaces it."""
        report, replica_id = replica.routing_stats, replica.replica_id.unique_id
        if not report:
            return self._snapshots.get(replica_id)
        if report["taken_s"] > self._report_times.get(replica_id, float("-inf")):
            self._report_times[replica_id] = report["taken_s"]
            self.replica_stats[replica_id] = self._stats_decoder.decode(report["stats"])
            self.replica_pids[replica_id] = report["pid"]
            snapshot = self._snapshot_decoder.decode(report["snapshot"])
            self._snapshots[replica_id] = dataclasses.replace(snapshot, replica_id=replica_id,
                                                              taken_s=report["taken_s"])
            self.ledger.polled(replica_id)
        return self._snapshots[replica_id]

    def refresh_soon(self) -> None:
        """From another thread (the ingress's /metrics): read the replicas' latest reports on the router's loop,
        which owns this state, so that they show between requests too."""
        self._event_loop.call_soon_threadsafe(self._refresh)

    def _refresh(self) -> None:
        for replica in list(self.curr_replicas.values()):
            self._snapshot(replica)
