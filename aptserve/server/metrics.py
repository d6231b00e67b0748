"""Prometheus metrics of the server, in a registry of its own (two apps in one process never collide)."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from aptserve.config import EngineConfig
from aptserve.core.messages import EngineStats, StepStats
from aptserve.outputs import RequestOutput

# vLLM's buckets, so dashboards built for vLLM read ours the same way.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                  10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0)
STEP_BUCKETS_S = (0.0001, 0.0003, 0.001, 0.003, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                  1.0, 2.0, 5.0)
# Where an engine step's time goes: the core's phases, the front end's output processing, and the gap between
# the core's steps (its loop's own work and idle time).
STEP_PHASES = ("schedule", "prepare", "forward", "sample", "update", "output", "gap")


class ServerMetrics:
    """Per-request counters and latency histograms, plus the engine's gauges read at scrape time."""

    def __init__(self, engine_stats: Callable[[], EngineStats], config: EngineConfig,
                 replica_stats: Callable[[], dict[str, EngineStats]] | None = None) -> None:
        self.registry = CollectorRegistry()
        # What the engine resolved its flags to (vLLM's *_config_info): one sample of value 1, the facts as labels.
        Gauge("aptserve:engine_config_info", "The engine's resolved settings.",
              ["model", "dtype", "kv_cache_dtype", "scheduler", "hybrid_cache", "block_size", "max_model_len"],
              registry=self.registry).labels(
            config.model.served_name, config.dtype, config.cache.dtype, config.scheduler.policy,
            config.cache.hybrid.value, str(config.cache.block_size), str(config.model.max_model_len)).set(1)
        self.requests_finished = Counter(
            "aptserve:request_success", "Requests finished, by finish reason (stop, length, abort, error).",
            ["finished_reason"], registry=self.registry)
        self.requests_rejected = Counter(
            "aptserve:request_rejected", "Requests refused with 503, by reason.", ["reason"],
            registry=self.registry)
        self.time_to_first_token = Histogram(
            "aptserve:time_to_first_token_seconds", "Time from arrival to the first token.",
            buckets=TTFT_BUCKETS_S, registry=self.registry)
        self.inter_token_latency = Histogram(
            "aptserve:inter_token_latency_seconds", "Time between consecutive tokens of a request.",
            buckets=ITL_BUCKETS_S, registry=self.registry)
        self.step_seconds = Histogram(
            "aptserve:step_phase_seconds", "Seconds of each engine step, by phase.", ["phase"],
            buckets=STEP_BUCKETS_S, registry=self.registry)
        self.step_tokens = Histogram(
            "aptserve:step_tokens", "Tokens fed to the model per engine step.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=self.registry)
        self.step_cpu_threads = Gauge(
            "aptserve:step_cpu_threads", "CPU threads the last engine step ran on (the cores other processes left "
            "free, at most torch's count; --no-cpu-threads-follow-load keeps torch's).", registry=self.registry)
        self.registry.register(_EngineStatsCollector(engine_stats, replica_stats))

    def observe_finished(self, output: RequestOutput) -> None:
        """Count a finished request and record its latencies (called once per request)."""
        reason = "error" if output.error is not None else output.outputs[0].finish_reason or "abort"
        self.requests_finished.labels(reason).inc()
        metrics = output.metrics
        if metrics is None or metrics.first_token_s is None:
            return
        self.time_to_first_token.observe(metrics.first_token_s - metrics.arrival_s)
        times = metrics.token_times_s
        for earlier, later in itertools.pairwise(times):
            self.inter_token_latency.observe(later - earlier)

    def observe_step(self, step: StepStats, output_s: float) -> None:
        phases = (step.schedule_s, step.prepare_s, step.forward_s, step.sample_s, step.update_s, output_s, step.gap_s)
        for phase, seconds in zip(STEP_PHASES, phases):
            self.step_seconds.labels(phase).observe(seconds)
        self.step_tokens.observe(step.num_decode_tokens + step.num_prefill_tokens)
        if step.num_threads:
            self.step_cpu_threads.set(step.num_threads)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineStatsCollector:
    """Gauges from the engine's last stats snapshot (the engine itself is not thread-safe); behind a cluster, the
    replicas' sum under the same names, and each replica's under `aptserve:replica_*` with a `replica` label."""

    def __init__(self, engine_stats: Callable[[], EngineStats],
                 replica_stats: Callable[[], dict[str, EngineStats]] | None = None) -> None:
        self._engine_stats = engine_stats
        self._replica_stats = replica_stats

    def collect(self) -> Iterator[Metric]:
        yield from _engine_gauges("aptserve:", {(): self._engine_stats()})
        if self._replica_stats is not None:
            yield from _engine_gauges("aptserve:replica_", {(replica,): stats for replica, stats
                                                            in sorted(self._replica_stats().items())}, ["replica"])


def _engine_gauges(prefix: str, stats_by_labels: dict[tuple[str, ...], EngineStats],
                   labels: list[str] | None = None) -> Iterator[Metric]:
    labels = labels or []
    gauges = (("num_requests_running", "Requests in the running batch.", GaugeMetricFamily,
               lambda stats: stats.num_running),
              ("num_requests_waiting", "Requests waiting to be scheduled.", GaugeMetricFamily,
               lambda stats: stats.num_waiting),
              ("cache_units_total", "Cache units in the pool.", GaugeMetricFamily,
               lambda stats: stats.cache_units_total),
              ("num_preemptions", "Preemptions since start.", CounterMetricFamily,
               lambda stats: stats.num_preemptions),
              ("num_demotions", "Running KV requests demoted to hidden rows where memory ran out, instead of a "
               "preemption (--preemption-mode).", CounterMetricFamily, lambda stats: stats.num_demotions),
              ("num_steps", "Engine steps since start.", CounterMetricFamily, lambda stats: stats.num_steps))
    gauges += (("prefix_cache_queries", "Prompt tokens looked up in the prefix cache (at first admissions).",
                CounterMetricFamily, lambda stats: stats.prefix_cache_queries),
               ("prefix_cache_hits", "Prompt tokens served from the prefix cache.", CounterMetricFamily,
                lambda stats: stats.prefix_cache_hits),
               ("prefix_cache_hit_rate", "Prefix cache hits over queries since start.", GaugeMetricFamily,
                lambda stats: stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries
                else 0.0))
    for name, doc, family_type, value in gauges:
        family = family_type(prefix + name, doc, labels=labels)
        for label_values, stats in stats_by_labels.items():
            family.add_metric(list(label_values), value(stats))
        yield family
    used = GaugeMetricFamily(prefix + "cache_units_used", "Cache units in use, by cache kind (scratch: lent to the "
                             "hidden cache's recompute buffer while hidden rows are held).",
                             labels=labels + ["kind"])
    cached = GaugeMetricFamily(prefix + "cache_units_cached", "Units of cached blocks no request reads: a prefix "
                               "hit reuses them, an allocation short of free units evicts them.", labels=labels)
    admissions = CounterMetricFamily(prefix + "admissions", "Requests admitted to the running batch (first "
                                     "admissions and re-admissions after a preemption), by cache kind.",
                                     labels=labels + ["kind"])
    for label_values, stats in stats_by_labels.items():
        for kind, num_units in stats.cache_units.items():
            if kind not in ("free", "cached"):
                used.add_metric([*label_values, kind], num_units)
        cached.add_metric(list(label_values), stats.cache_units.get("cached", 0))
        for kind, count in stats.admissions.items():
            admissions.add_metric([*label_values, kind], count)
    yield used
    yield cached
    yield admissions
