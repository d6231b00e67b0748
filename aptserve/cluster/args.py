"""The cluster flags: how many engine replicas and how requests are spread over them (RoutingArgs, which `aptserve
serve` and `aptserve sim` share), and where Ray runs (ClusterArgs, serve's). Pure (no Ray): one replica, the
default, never imports Ray."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar

from aptserve.cluster.policy import ROUTERS
from aptserve.flags import FlagTable, check_positive, flag


@dataclass(frozen=True)
class RoutingArgs(FlagTable):
    cli_group: ClassVar[str] = "cluster (several engine replicas behind a router)"

    replicas: int = flag(1, "engine replicas, each with its own cache pool (--kv-cache-memory is per replica); "
                         "served: cores / replicas CPUs each on Ray Serve, and 1 serves in this process without Ray "
                         "(alias: --data-parallel-size)", int)
    router: str = flag("apt-slo", "how requests are spread over the replicas: apt-slo (the most predicted SLO "
                       "slack), least-load (4 x waiting + running), pow2 (the less loaded of two at random), "
                       "round-robin", choices=ROUTERS)
    shed: bool = flag(False, "with --router apt-slo, refuse (HTTP 503) a request no replica is predicted to serve "
                      "within its SLOs instead of queueing it", action="store_true")
    routing_stats_period_s: float = flag(0.5, "how often the router polls each replica's state (seconds); between "
                                         "polls it adds what it sent (simulated: 0 polls at every request)", float)

    def __post_init__(self) -> None:
        check_positive({"replicas": self.replicas})
        if self.shed and self.router != "apt-slo":
            raise ValueError("--shed needs --router apt-slo (the only router that predicts SLO misses)")
        if self.routing_stats_period_s < 0:
            raise ValueError(f"routing_stats_period_s must be >= 0, got {self.routing_stats_period_s}")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        super().add_cli_args(parser)
        # vLLM's name for the same thing: engine copies, each serving whole requests.
        parser.add_argument("--data-parallel-size", "-dp", dest="replicas", type=int, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)


@dataclass(frozen=True)
class ClusterArgs(RoutingArgs):
    cli_group: ClassVar[str] = "cluster (several engine replicas on Ray Serve; needs the `cluster` extra)"

    ray_address: str | None = flag(None, "join this running Ray cluster (e.g. ray://head:10001 or auto) instead "
                                   "of starting one on this machine")
    num_cpus: int | None = flag(None, "CPUs of the local Ray cluster, shared by the replicas (default: this "
                                "machine's)", int)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive({"num_cpus": self.num_cpus})
        if self.routing_stats_period_s <= 0:  # Ray's replicas report on a timer
            raise ValueError(f"routing_stats_period_s must be > 0, got {self.routing_stats_period_s}")
