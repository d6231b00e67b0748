"""One server under one trace: the unloaded-latency probe, SLOs derived from it, and the rate sweep.

Shared by `aptserve bench` and benchmarks/serve_compare.py, so both measure servers the same way: the same trace,
the same seeded gamma arrivals at each rate, greedy requests of exactly the trace's output length (`ignore_eos`).
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from aptserve.bench.arrivals import gamma_send_offsets_s
from aptserve.bench.client import run_trace
from aptserve.bench.datasets import TraceRequest
from aptserve.bench.traces import load_trace
from aptserve.bench.metrics import RequestRecord, request_metrics, summarize
from aptserve.bench.sweep import interpolate_crossing, sweep_rates, sweep_then_bisect

# How the unloaded latency behind `--slo-scale` is measured; copied into every result JSON.
UNLOADED_DEFINITION = (
    "one warm-up request, then the num_probes trace requests whose prompt lengths are nearest the trace's median "
    "prompt length, sent one at a time (each alone on the server) with max_tokens = min(output_len, "
    "probe_max_tokens); unloaded TTFT = median of their TTFTs, unloaded TBT = median of their per-request P99 "
    "inter-token gaps, unloaded TPOT = median of their mean TPOTs; SLO = slo_scale x the unloaded value")
ATTAINMENT_RULES = {"paper": "attainment", "vllm": "attainment_vllm"}


@dataclass(frozen=True)
class BenchSpec:
    """What every server is measured on; `rates` are requests/s, swept in ascending order.

    `trace` is what the unloaded probes draw from and what every rate replays, unless `windows` are given: then
    the k-th measured rate replays windows[k % len(windows)], so no prompt comes back to a server's prefix cache
    (serving peers cache prefixes by default; a replayed trace would skip their prefills)."""
    model: str
    trace: tuple[TraceRequest, ...]
    rates: tuple[float, ...]
    cv: float = 1.0
    seed: int = 0
    target: float = 0.9
    api: str = "completions"
    max_concurrency: int | None = None
    timeout_s: float = 300.0
    bisect: bool = False
    max_num_probes: int = 8
    progress: bool = True
    windows: tuple[tuple[TraceRequest, ...], ...] = ()

    def trace_for_point(self, index: int) -> tuple[TraceRequest, ...]:
        return self.windows[index % len(self.windows)] if self.windows else self.trace


def load_bench_trace(dataset: str, tokenizer: Any, num_requests: int, seed: int,
                     max_output_len: int | None = None, **options: Any) -> list[TraceRequest]:
    """`load_trace`; with `max_output_len`, the first `num_requests` with output_len <= max_output_len of a larger
    seeded draw (a filter, not a cap, so the kept lengths keep the dataset's shape; deterministic per seed)."""
    if max_output_len is None:
        return load_trace(dataset, tokenizer, num_requests, seed, **options)
    if dataset == "sharegpt":  # the same requests as the draws below, without drawing more than there are
        return load_trace(dataset, tokenizer, num_requests, seed, max_output_len=max_output_len, **options)
    if dataset == "sharegpt-multiturn":  # a cap: dropping a turn would break the chain of prompts
        return load_trace(dataset, tokenizer, num_requests, seed, max_output_len=max_output_len, **options)
    for num_drawn in (4 * num_requests, 16 * num_requests, 64 * num_requests):
        drawn = load_trace(dataset, tokenizer, num_drawn, seed, **options)
        kept = [r for r in drawn if r.output_len <= max_output_len]
        if len(kept) >= num_requests:
            return kept[:num_requests]
    raise ValueError(f"only {len(kept)} of {num_drawn} {dataset} requests have output_len <= {max_output_len}")


def trace_stats(trace: Sequence[TraceRequest]) -> dict:
    prompt_lens, output_lens = [r.prompt_len for r in trace], [r.output_len for r in trace]
    return {"num_requests": len(trace),
            **{f"{stat}_prompt_len": float(fn(prompt_lens)) for stat, fn in _STATS.items()},
            **{f"{stat}_output_len": float(fn(output_lens)) for stat, fn in _STATS.items()}}


_STATS = {"mean": np.mean, "p50": np.median, "max": np.max}


def _run(base_url: str, spec: BenchSpec, trace: Sequence[TraceRequest], offsets_s: Sequence[float],
         progress: bool) -> tuple[list[RequestRecord], float]:
    start_s = time.perf_counter()
    records = asyncio.run(run_trace(base_url, spec.model, trace, offsets_s, api=spec.api,
                                    max_concurrency=spec.max_concurrency, timeout_s=spec.timeout_s,
                                    progress=progress))
    return records, time.perf_counter() - start_s


def measure_unloaded(base_url: str, spec: BenchSpec, num_probes: int = 5, probe_max_tokens: int = 32) -> dict:
    """The server's latency with nothing else running (see UNLOADED_DEFINITION); raises if a probe fails."""
    def run_alone(request: TraceRequest) -> RequestRecord:
        return _run(base_url, spec, [request], [0.0], progress=False)[0][0]

    return unloaded_latency(run_alone, spec.trace, num_probes, probe_max_tokens)


def unloaded_latency(run_alone: Callable[[TraceRequest], RequestRecord], trace: Sequence[TraceRequest],
                     num_probes: int, probe_max_tokens: int) -> dict:
    """UNLOADED_DEFINITION over `run_alone` (a served or a simulated request with nothing else running)."""
    median_len = float(np.median([r.prompt_len for r in trace]))
    nearest = sorted(range(len(trace)), key=lambda i: (abs(trace[i].prompt_len - median_len), i))
    probes = [replace(trace[i], output_len=min(trace[i].output_len, probe_max_tokens)) for i in nearest[:num_probes]]
    metrics = []
    for request in [probes[-1], *probes]:  # the first, a warm-up, is not counted
        record = run_alone(request)
        if not record.completed:
            raise RuntimeError(f"unloaded probe failed: {record.error}")
        metrics.append(request_metrics(record))
    metrics = metrics[1:]
    values = {"ttft_s": [m.ttft_s for m in metrics], "p99_tbt_s": [m.p99_tbt_s for m in metrics],
              "mean_tpot_s": [m.mean_tpot_s for m in metrics]}
    return {"num_probes": len(probes), "probe_max_tokens": probe_max_tokens,
            "probe_prompt_lens": [r.prompt_len for r in probes], **values,
            **{f"median_{name}": float(np.median(v)) for name, v in values.items()}}


def slos_from_unloaded(unloaded: dict, scale: float) -> dict:
    """SLOs = scale x the unloaded latencies (TBT for the paper's rule, mean TPOT for vLLM's)."""
    return {"ttft_slo_s": scale * unloaded["median_ttft_s"], "tbt_slo_s": scale * unloaded["median_p99_tbt_s"],
            "tpot_slo_s": scale * unloaded["median_mean_tpot_s"], "source": "slo_scale", "slo_scale": scale,
            "unloaded": unloaded, "unloaded_definition": UNLOADED_DEFINITION}


def run_rate(base_url: str, spec: BenchSpec, slos: dict, rate: float, point_index: int = 0) -> dict:
    """One sweep point: the point's trace at `rate` (seeded gamma arrivals), summarized, with per-request
    latencies kept for CDFs (None for a failed request)."""
    trace = spec.trace_for_point(point_index)
    offsets_s = gamma_send_offsets_s(len(trace), rate, spec.cv, spec.seed)
    records, duration_s = _run(base_url, spec, trace, offsets_s, spec.progress)
    return sweep_point(rate, records, duration_s, slos)


def sweep_point(rate: float, records: list[RequestRecord], duration_s: float, slos: dict) -> dict:
    """A point of a sweep, measured or simulated: the summary and each request's latencies (for CDFs)."""
    summary = summarize(records, slos["ttft_slo_s"], slos["tbt_slo_s"], duration_s, slos["tpot_slo_s"])
    metrics = [request_metrics(r) if r.completed else None for r in records]
    requests = {name: [None if m is None else getattr(m, name) for m in metrics]
                for name in ("ttft_s", "p99_tbt_s", "mean_tpot_s")}
    return {"rate": rate, **summary, "requests": requests}


def bench_server(base_url: str, spec: BenchSpec, slos: dict, name: str = "server") -> dict:
    """Sweep (or sweep then bisect) the rates against one server; points come back sorted by rate."""
    points: dict[float, dict] = {}

    def measure(rate: float) -> float:
        points[rate] = run_rate(base_url, spec, slos, rate, len(points))
        p = points[rate]
        tqdm.write(f"{name} rate {rate:g}/s: attainment {p['attainment']:.2f} (vLLM rule {p['attainment_vllm']:.2f})"
            f", p99 TTFT {_fmt(p['p99_ttft_s'])} s, p99 TBT {_fmt(p['p99_p99_tbt_s'])} s, failed {p['failed']}")
        return p["attainment"]

    if spec.bisect:
        sweep_then_bisect(measure, spec.rates, spec.target, max_num_probes=spec.max_num_probes)
    else:
        sweep_rates(measure, spec.rates, spec.target)
    ordered = [points[rate] for rate in sorted(points)]
    return {"base_url": base_url, "points": ordered, "effective_throughput": effective_throughput(ordered, spec.target)}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def effective_throughput(points: Sequence[dict], target: float) -> dict:
    """Per rule: the highest measured rate whose attainment >= target (None if none), and the rate where the
    curve first crosses below the target, interpolated linearly (DistServe's convention; None if it never does)."""
    result = {}
    for rule, key in ATTAINMENT_RULES.items():
        rates, attainments = [p["rate"] for p in points], [p[key] or 0.0 for p in points]
        passing = [rate for rate, attainment in zip(rates, attainments) if attainment >= target]
        result[rule] = {"best_rate": max(passing, default=None),
                        "interpolated_rate": interpolate_crossing(rates, attainments, target)}
    return result


def throughput_ratios(servers: dict[str, dict], reference: str) -> dict:
    """Each server's effective throughput over the reference's, per rule; None where either is undefined."""
    base = servers.get(reference, {}).get("effective_throughput")
    if base is None:
        return {}
    ratios = {}
    for name, server in servers.items():
        if name == reference or "effective_throughput" not in server:
            continue
        ratios[f"{name}/{reference}"] = {
            rule: {kind: _ratio(server["effective_throughput"][rule][kind], base[rule][kind])
                   for kind in ("best_rate", "interpolated_rate")} for rule in ATTAINMENT_RULES}
    return ratios


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 or math.isinf(b) else a / b
