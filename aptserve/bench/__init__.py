"""Benchmarking: request traces, arrival processes, a streaming OpenAI client, SLO metrics and rate sweeps.

Pure Python + numpy + httpx (no torch), so it can drive aptserve, vLLM or any OpenAI-compatible server alike.
"""
from aptserve.bench.arrivals import burstiness_to_cv, cv_to_burstiness, gamma_send_offsets_s
from aptserve.bench.client import run_trace
from aptserve.bench.datasets import TraceRequest
from aptserve.bench.traces import load_trace
from aptserve.bench.metrics import RequestRecord, request_metrics, summarize
from aptserve.bench.sweep import SweepResult, bisect_rate, interpolate_crossing, sweep_rates, sweep_then_bisect

__all__ = ["TraceRequest", "load_trace", "gamma_send_offsets_s", "burstiness_to_cv", "cv_to_burstiness",
           "run_trace", "RequestRecord", "request_metrics", "summarize", "SweepResult", "sweep_rates",
           "bisect_rate", "sweep_then_bisect", "interpolate_crossing"]
