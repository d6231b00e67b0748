"""The ingress's front end over engine replicas on Ray Serve: ClusterEngine stands where AsyncLLM stands under the
single-node routes (create_app takes either). Requests are checked and tokenized here and sent through a Serve
DeploymentHandle (its PolicyRouter picks the replica); each answer streams back through a ClusterStream, with Ray's
failures turned into the server's own errors: 503 when every replica is full or the router sheds, a failed request
(an error event in a stream) when its replica dies.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from aptserve.config import EngineConfig
from aptserve.core.messages import EngineStats
from aptserve.errors import AptServeError, EngineOverloadedError
from aptserve.inputs import InputProcessor
from aptserve.outputs import RequestOutput
from aptserve.sampling import SamplingParams
from aptserve.server.async_llm import (INLINE_TOKENIZE_CHARS, RequestCutError, RequestFailedError,
                                      ServerDrainingError)
from aptserve.server.metrics import ServerMetrics

live_routers: list = []  # PolicyRouters (ray_router.py) in this process: what its /metrics and /health read


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
    """The routes' EngineClient (server/engine_client.py) over N replicas."""

    def __init__(self, handle, config: EngineConfig, tokenizer, on_shutdown) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.input_processor = InputProcessor(config, tokenizer)
        self.metrics = ServerMetrics(self._total_stats, config, self._replica_stats)
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

    def check_capacity(self, num_requests: int = 1) -> None:
        """Only the drain: the replicas' queues are Ray Serve's, which refuses what does not fit as it routes."""
        if self.draining:
            raise ServerDrainingError("the server is shutting down; send the request to another replica")

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          ttft_slo_s: float | None = None, tbt_slo_s: float | None = None) -> ClusterStream:
        self.check_capacity()
        if isinstance(prompt, str) and len(prompt) > INLINE_TOKENIZE_CHARS:
            processed = await asyncio.to_thread(self.input_processor.process, prompt, params)
        else:
            processed = self.input_processor.process(prompt, params)
        # The router weighs the SLOs the replica will hold the request to.
        ttft_slo_s, tbt_slo_s = self.config.scheduler.request_slos(ttft_slo_s, tbt_slo_s)
        generator = self._handle.generate.remote(
            request_id=request_id, prompt_token_ids=processed.token_ids, params=processed.params,
            ttft_slo_s=ttft_slo_s, tbt_slo_s=tbt_slo_s)
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
        admissions: dict[str, int] = {}
        for stats in replicas:
            for kind, num_units in stats.cache_units.items():
                units[kind] = units.get(kind, 0) + num_units
            for kind, count in stats.admissions.items():
                admissions[kind] = admissions.get(kind, 0) + count
        total = lambda field: sum(getattr(stats, field) for stats in replicas)  # noqa: E731
        return EngineStats(total("num_running"), total("num_waiting"), total("cache_units_total"), units,
                           total("num_preemptions"), total("num_conversions"), total("num_steps"),
                           self.config.cache.hybrid.value, total("prefix_cache_queries"),
                           total("prefix_cache_hits"), admissions, total("num_demotions"))


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
