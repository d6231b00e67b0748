"""Engine replicas on Ray Serve behind aptserve's router, and the front end that serves the OpenAI API over them.

- EngineReplica, a Serve deployment: one engine each, built exactly as `aptserve serve` builds one (AsyncLLM over
  its engine-core process). It streams a request's outputs; a client that leaves cancels the stream, which aborts
  the request there and frees its cache. It reports its ReplicaSnapshot to the router (`record_routing_stats`) and
  its health (`check_health`: a dead engine core gets the replica replaced).
- PolicyRouter, Serve's RequestRouter: asks aptserve.cluster.policy which replica, from the replicas' last reports
  plus a ledger of what it sent since; with --shed it refuses a request no replica can serve within its SLOs.
- ClusterEngine: the front end's surface that the single-node routes use (create_app takes it as it takes AsyncLLM).
  Requests are checked and tokenized here, sent through a DeploymentHandle, and Ray's failures become the
  server's own errors (503 when every replica is full or the router sheds, an error event when a replica dies).
- start_cluster: a local Ray cluster (or --ray-address), Serve without its HTTP proxy: this process is the ingress.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator

import msgspec
import ray
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.config import ProxyLocation, RequestRouterConfig
from ray.serve.exceptions import BackPressureError

from aptserve.cluster.args import ClusterArgs
from aptserve.config import EngineConfig
from aptserve.core.messages import EngineStats
from aptserve.engine_args import EngineArgs
from aptserve.errors import AptServeError, EngineOverloadedError
from aptserve.inputs import InputProcessor
from aptserve.outputs import RequestOutput
from aptserve.runner.model_runner import NUM_THREADS_ENV
from aptserve.sampling import SamplingParams
from aptserve.server.args import ServerArgs
from aptserve.server.async_llm import (INLINE_TOKENIZE_CHARS, AsyncLLM, RequestCutError, RequestFailedError,
                                      ServerDrainingError)
from aptserve.server.metrics import ServerMetrics

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
            async for output in stream:
                # The prompt's ids ride only on the last output (usage); per token they would be copied each time.
                yield output if output.finished else dataclasses.replace(output, prompt_token_ids=[])
        finally:  # finished, failed, or cancelled by the front end (its client left): abort unless finished
            stream.close()

    def record_routing_stats(self) -> dict:
        return {"stats": msgspec.msgpack.encode(self.engine.stats), "taken_s": time.time(), "pid": os.getpid()}

    def check_health(self) -> None:
        if not self.engine.is_running:
            raise RuntimeError(f"the engine is not running: {self.engine.dead_reason}")

    async def __del__(self) -> None:
        await self.engine.shutdown()


# --- the router (aptserve/cluster/ray_router.py) ----------------------------------------------------
live_routers: list = []  # PolicyRouters in this process (the ingress's): what its /metrics and /health read


# --- the ingress's front end -----------------------------------------------------------------------
class ClusterStream:
    """One request's outputs from its replica, with the front end's errors in place of Ray's."""

    def __init__(self, request_id: str, generator, engine: ClusterEngine) -> None:
        self.request_id = request_id
        self.finished = False
        self._generator, self._engine = generator, engine
        self._first: RequestOutput | None = None
        self._cut: AptServeError | None = None

    async def start(self) -> None:
        """Wait for the first output, so that a refusal (every replica full, shed, bad request) is the answer."""
        self._first = await self._next()

    def __aiter__(self) -> ClusterStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self.finished:
            raise StopAsyncIteration
        return await self._next()

    async def _next(self) -> RequestOutput:
        try:
            output = await self._generator.__anext__()
        except StopAsyncIteration:
            self._end()
            raise
        except Exception as exc:
            self._end()
            raise self._cut or _front_end_error(exc) from exc
        if output.error is not None:
            self._end()
            raise RequestFailedError(f"the engine failed on this request: {output.error}")
        if output.finished:
            self._end()
            self._engine.metrics.observe_finished(output)
        return output

    def close(self) -> None:
        """Abort the request unless it finished (client gone, handler failed); safe to call twice."""
        if not self.finished:
            self._end()
            self._generator.cancel()  # the replica's generator is cancelled, and aborts the request there
            self._engine.metrics.requests_finished.labels("abort").inc()

    def cut(self, error: AptServeError) -> None:
        self._cut = error
        self._end()
        self._generator.cancel()

    def _end(self) -> None:
        self.finished = True
        self._engine.streams.pop(self.request_id, None)


def _front_end_error(exc: Exception) -> AptServeError:
    if isinstance(exc, AptServeError):
        return exc
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, AptServeError):  # the replica refused it
        return exc.cause
    if isinstance(exc, BackPressureError):
        return EngineOverloadedError("every replica is full and the cluster's queue is too (--max-queue-len); "
                                     "retry later")
    if isinstance(exc, RayActorError):
        return RequestFailedError(f"the replica serving this request stopped: {exc.__class__.__name__}")
    return RequestFailedError(f"the cluster failed this request: {exc.__class__.__name__}: {exc}")


class ClusterEngine:
    """AsyncLLM's surface for the routes, over N replicas."""

    def __init__(self, handle, config: EngineConfig, tokenizer, on_shutdown) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.input_processor = InputProcessor(config, tokenizer)
        self.metrics = ServerMetrics(self._total_stats, self._replica_stats)
        self.metrics.registry.register(_RoutingCollector())
        self.draining = False
        self.dead_reason: str | None = None
        self.streams: dict[str, ClusterStream] = {}
        self._handle = handle.options(stream=True)
        self._on_shutdown = on_shutdown
        self._stopped = False

    def start(self) -> None:
        pass  # the replicas were up before the app was built

    async def shutdown(self) -> None:
        self._stopped = True
        self._cut_all(RequestFailedError("the server is shutting down"))
        await asyncio.to_thread(self._on_shutdown)

    @property
    def is_running(self) -> bool:
        router = _router()
        return not self._stopped and (router is None or bool(router.curr_replicas))

    @property
    def num_unfinished(self) -> int:
        return len(self.streams)

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          ttft_slo_s: float | None = None, tbt_slo_s: float | None = None) -> ClusterStream:
        if self.draining:
            raise ServerDrainingError("the server is shutting down; send the request to another replica")
        if isinstance(prompt, str) and len(prompt) > INLINE_TOKENIZE_CHARS:
            processed = await asyncio.to_thread(self.input_processor.process, prompt, params)
        else:
            processed = self.input_processor.process(prompt, params)
        scheduler = self.config.scheduler
        generator = self._handle.generate.remote(
            request_id=request_id, prompt_token_ids=processed.token_ids, params=processed.params,
            ttft_slo_s=ttft_slo_s or scheduler.ttft_slo_s, tbt_slo_s=tbt_slo_s or scheduler.tbt_slo_s)
        stream = ClusterStream(request_id, generator, self)
        self.streams[request_id] = stream
        try:
            await stream.start()
        except BaseException:  # refused, or this handler was cancelled while it waited: nothing left running
            stream.close()
            raise
        return stream

    def cut_unfinished(self) -> int:
        return self._cut_all(RequestCutError("the server shut down before this request finished"))

    def _cut_all(self, error: AptServeError) -> int:
        streams = list(self.streams.values())
        for stream in streams:
            stream.cut(error)
        return len(streams)

    def _replica_stats(self) -> dict[str, EngineStats]:
        router = _router()
        if router is None:
            return {}
        router.refresh_soon()
        return dict(router.replica_stats)

    def _total_stats(self) -> EngineStats:
        replicas = list(self._replica_stats().values())
        units: dict[str, int] = {}
        for stats in replicas:
            for kind, num_units in stats.cache_units.items():
                units[kind] = units.get(kind, 0) + num_units
        total = lambda field: sum(getattr(stats, field) for stats in replicas)  # noqa: E731
        return EngineStats(total("num_running"), total("num_waiting"), total("cache_units_total"), units,
                           total("num_preemptions"), total("num_conversions"), total("num_steps"),
                           self.config.cache.hybrid.value, None, total("prefix_cache_queries"),
                           total("prefix_cache_hits"))


def _router():
    return live_routers[-1] if live_routers else None


class _RoutingCollector:
    """Where the router sent requests, and which process each replica is (to find the one to look at)."""

    def collect(self) -> Iterator[Metric]:
        router = _router()
        routed = CounterMetricFamily("aptserve:replica_requests_routed", "Requests the router sent to each replica.",
                                     labels=["replica"])
        info = GaugeMetricFamily("aptserve:replica_info", "One per live replica: its process id.",
                                 labels=["replica", "pid"])
        if router is not None:
            for replica, count in sorted(dict(router.num_routed).items()):
                routed.add_metric([replica], count)
            for replica, pid in sorted(dict(router.replica_pids).items()):
                info.add_metric([replica, str(pid)], 1)
        yield routed
        yield info


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
    app = deployment.bind(engine_args, server_args, max(1, int(cpus_per_replica)))
    logger.info("starting %d engine replicas (%.2g CPUs each, router %s)", cluster_args.replicas,
                cpus_per_replica, cluster_args.router)
    handle = serve.run(app, name=APP_NAME, route_prefix=None)
    config = handle.engine_config.remote().result()
    return ClusterEngine(handle, config, load_tokenizer(config.model.path), stop_cluster)


def stop_cluster() -> None:
    serve.shutdown()
    ray.shutdown()
