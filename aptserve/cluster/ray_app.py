"""Engine replicas on Ray Serve behind aptserve's router, and starting them under this process's API.

- EngineReplica, a Serve deployment: one engine each, built exactly as `aptserve serve` builds one (AsyncLLM over
  its engine-core process). It streams a request's outputs; a client that leaves cancels the stream, which aborts
  the request there and frees its cache. When the router polls (`record_routing_stats`) it reports the snapshot its
  engine core takes then (core/snapshot.py), and
  its health (`check_health`: a dead engine core gets the replica replaced).
- PolicyRouter (ray_router.py), Serve's RequestRouter: asks aptserve.cluster.policy which replica, from the
  replicas' last reports plus a ledger of what it sent since; with --shed it refuses what no replica can serve in
  time.
- ClusterEngine (ingress.py): the front end's surface that the single-node routes use, over the replicas.
- start_cluster: a local Ray cluster (or --ray-address), Serve without its HTTP proxy: this process is the ingress.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator

import msgspec
import ray
from ray import serve
from ray.serve.config import ProxyLocation, RequestRouterConfig

from aptserve.cluster.args import ClusterArgs
from aptserve.cluster.ingress import ClusterEngine
from aptserve.config import EngineConfig
from aptserve.engine_args import EngineArgs
from aptserve.outputs import RequestOutput
from aptserve.runner.model_runner import NUM_THREADS_ENV
from aptserve.sampling import SamplingParams
from aptserve.server.args import ServerArgs
from aptserve.server.async_llm import AsyncLLM

logger = logging.getLogger(__name__)
APP_NAME = "aptserve"
DEPLOYMENT_NAME = "engine"


# --- the replica ---------------------------------------------------------------------------------
class EngineReplica:
    async def __init__(self, engine_args: EngineArgs, server_args: ServerArgs, num_threads: int) -> None:
        os.environ[NUM_THREADS_ENV] = str(num_threads)  # the engine-core process inherits it
        # Loading the model blocks: off this replica's event loop, so Serve's health probes still get answers.
        self.engine = await asyncio.to_thread(AsyncLLM.launch, engine_args, server_args)
        self.engine.start()

    def engine_config(self) -> EngineConfig:
        return self.engine.config

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       ttft_slo_s: float, tbt_slo_s: float) -> AsyncIterator[RequestOutput]:
        stream = await self.engine.add_request(request_id, prompt_token_ids, params, ttft_slo_s, tbt_slo_s)
        try:
            first = True
            async for output in stream:
                # The prompt's ids ride only on the first output (echo) and the last (usage); per token they would be
                # copied each time.
                yield output if output.finished or first else dataclasses.replace(output, prompt_token_ids=[])
                first = False
        finally:  # finished, failed, or cancelled by the front end (its client left): abort unless finished
            stream.close()

    async def record_routing_stats(self) -> dict:
        """The router's poll: the engine core's snapshot, taken now, and the gauges for the ingress's /metrics."""
        snapshot, stats = await self.engine.snapshot()  # taken together: the gauges show what the router sees
        return {"snapshot": msgspec.msgpack.encode(snapshot), "stats": msgspec.msgpack.encode(stats),
                "taken_s": time.time(), "pid": os.getpid()}

    def check_health(self) -> None:
        if not self.engine.is_running:
            raise RuntimeError(f"the engine is not running: {self.engine.dead_reason}")

    async def __del__(self) -> None:
        await self.engine.shutdown()


# --- starting it -----------------------------------------------------------------------------------
def start_cluster(engine_args: EngineArgs, server_args: ServerArgs, cluster_args: ClusterArgs) -> ClusterEngine:
    """Start (or join) Ray, deploy the replicas and wait until each has loaded its model."""
    from aptserve.registry import load_tokenizer

    if cluster_args.ray_address:
        ray.init(address=cluster_args.ray_address, logging_level=logging.WARNING)
        num_cpus = cluster_args.num_cpus or int(ray.cluster_resources().get("CPU", 1))
    else:
        num_cpus = cluster_args.num_cpus or os.cpu_count() or 1
        # Loopback only, and no dashboard: a serving node should not open ports nobody asked for.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)
    cpus_per_replica = num_cpus / cluster_args.replicas
    serve.start(proxy_location=ProxyLocation.Disabled)  # this process serves HTTP; no Serve proxy actor
    deployment = serve.deployment(
        EngineReplica, name=DEPLOYMENT_NAME, num_replicas=cluster_args.replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        # The replica's own door (--max-queue-len) stays the judge; Serve stops sending past what it can hold.
        max_ongoing_requests=engine_args.max_num_seqs + server_args.max_queue_len,
        max_queued_requests=server_args.max_queue_len,
        health_check_period_s=2.0, health_check_timeout_s=30.0,
        logging_config={"enable_access_log": False, "log_level": "WARNING"},  # a line per request costs a core
        request_router_config=RequestRouterConfig(
            request_router_class="aptserve.cluster.ray_router:PolicyRouter",
            request_router_kwargs={"router": cluster_args.router, "shed": cluster_args.shed,
                                   "seed": engine_args.seed},
            request_routing_stats_period_s=cluster_args.routing_stats_period_s,
            request_routing_stats_timeout_s=max(5.0, 4 * cluster_args.routing_stats_period_s)))
    # Replicas start together: each would time its warm-up against the others' and route on a model that slow,
    # so they start from the prior and fit on the steps they serve.
    app = deployment.bind(dataclasses.replace(engine_args, warm_up=False), server_args, max(1, int(cpus_per_replica)))
    logger.info("starting %d engine replicas (%.2g CPUs each, router %s)", cluster_args.replicas,
                cpus_per_replica, cluster_args.router)
    handle = serve.run(app, name=APP_NAME, route_prefix=None)
    config = handle.engine_config.remote().result()
    return ClusterEngine(handle, config, load_tokenizer(config.model.path), stop_cluster)


def stop_cluster() -> None:
    serve.shutdown()
    ray.shutdown()
