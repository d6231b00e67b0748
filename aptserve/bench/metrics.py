"""Per-request latency metrics, SLO checks under both conventions, and the per-run summary.

Paper rule (Apt-Serve): a request meets its SLO iff TTFT < ttft_slo and P99 TBT < tbt_slo (strict), where P99 TBT
is `np.percentile` (linear) over the gaps between tokens after the first; a request with no gaps has P99 TBT 0.
vLLM / DistServe rule: TTFT <= ttft_slo and mean TPOT <= tpot_slo (inclusive). Under both, a failed request is a
violation and attainment = requests that meet / all requests.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RequestRecord:
    """What the client saw of one request. Times are `time.perf_counter()` seconds; `token_times_s` has one entry
    per token-bearing stream event (the first is the first token); `output_len` counts generated tokens (the
    server's usage when reported, so it can exceed the number of events when a chunk carries several tokens)."""
    ok: bool
    prompt_len: int
    output_len: int
    send_s: float
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.ok and self.first_token_s is not None and bool(self.token_times_s)


@dataclass(frozen=True)
class RequestMetrics:
    ttft_s: float
    itl_s: list[float]  # gaps between token events after the first token
    p99_tbt_s: float
    mean_tpot_s: float
    e2e_s: float


def request_metrics(record: RequestRecord) -> RequestMetrics:
    """Latencies of one completed request (raises ValueError for a failed one)."""
    if not record.completed:
        raise ValueError(f"no latencies for a failed request: {record.error}")
    ttft_s = record.first_token_s - record.send_s
    itl_s = np.diff(record.token_times_s).tolist()
    p99_tbt_s = float(np.percentile(itl_s, 99)) if itl_s else 0.0
    e2e_s = record.token_times_s[-1] - record.send_s
    mean_tpot_s = (e2e_s - ttft_s) / (record.output_len - 1) if record.output_len > 1 else 0.0
    return RequestMetrics(ttft_s, itl_s, p99_tbt_s, mean_tpot_s, e2e_s)


def meets_slo_paper(metrics: RequestMetrics, ttft_slo_s: float, tbt_slo_s: float) -> bool:
    return metrics.ttft_s < ttft_slo_s and metrics.p99_tbt_s < tbt_slo_s


def meets_slo_vllm(metrics: RequestMetrics, ttft_slo_s: float, tpot_slo_s: float) -> bool:
    return metrics.ttft_s <= ttft_slo_s and metrics.mean_tpot_s <= tpot_slo_s


def _stats(name: str, values: list[float]) -> dict[str, float | None]:
    """mean / p50 / p99 of `values` under `name`; None when there are no values (JSON null, not NaN)."""
    if not values:
        return {f"mean_{name}": None, f"p50_{name}": None, f"p99_{name}": None}
    return {f"mean_{name}": float(np.mean(values)), f"p50_{name}": float(np.percentile(values, 50)),
            f"p99_{name}": float(np.percentile(values, 99))}


def _top_errors(records: list[RequestRecord], num_kinds: int = 5) -> dict[str, int]:
    """The most common failure messages and their counts, to tell a dead server from a few timeouts."""
    errors = Counter(r.error or "no tokens received" for r in records if not r.completed)
    return dict(errors.most_common(num_kinds))


def _attainments(metrics: list[RequestMetrics], num_requests: int, ttft_slo_s: float, tbt_slo_s: float,
                 tpot_slo_s: float) -> dict[str, float | None]:
    """Fractions of all requests (failed ones included) that meet each check; None for an empty run."""
    checks = {
        "attainment": lambda m: meets_slo_paper(m, ttft_slo_s, tbt_slo_s),
        "attainment_vllm": lambda m: meets_slo_vllm(m, ttft_slo_s, tpot_slo_s),
        "attainment_ttft_only": lambda m: m.ttft_s < ttft_slo_s,
        "attainment_tbt_only": lambda m: m.p99_tbt_s < tbt_slo_s,
    }
    return {name: sum(map(check, metrics)) / num_requests if num_requests else None
            for name, check in checks.items()}


def summarize(records: list[RequestRecord], ttft_slo_s: float, tbt_slo_s: float, duration_s: float,
              tpot_slo_s: float | None = None) -> dict:
    """JSON-serialisable run summary; `tpot_slo_s` (vLLM rule) defaults to `tbt_slo_s`."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    tpot_slo_s = tbt_slo_s if tpot_slo_s is None else tpot_slo_s
    completed = [r for r in records if r.completed]
    metrics = [request_metrics(r) for r in completed]
    num_output_tokens = sum(r.output_len for r in completed)
    num_prompt_tokens = sum(r.prompt_len for r in completed)
    summary = {
        "num_requests": len(records), "completed": len(completed), "failed": len(records) - len(completed),
        "errors": _top_errors(records),
        "ttft_slo_s": ttft_slo_s, "tbt_slo_s": tbt_slo_s, "tpot_slo_s": tpot_slo_s, "duration_s": duration_s,
        **_attainments(metrics, len(records), ttft_slo_s, tbt_slo_s, tpot_slo_s),
        # Requests whose server-side token count exceeds their stream events: their ITL under-counts gaps.
        "num_multi_token_event_requests": sum(r.output_len > len(r.token_times_s) for r in completed),
        "num_prompt_tokens": num_prompt_tokens, "num_output_tokens": num_output_tokens,
        "request_throughput": len(completed) / duration_s,
        "output_token_throughput": num_output_tokens / duration_s,
        "total_token_throughput": (num_prompt_tokens + num_output_tokens) / duration_s,
    }
    summary |= _stats("ttft_s", [m.ttft_s for m in metrics])
    # TPOT is defined only for requests with more than one output token (vLLM's convention).
    summary |= _stats("tpot_s", [m.mean_tpot_s for m, r in zip(metrics, completed) if r.output_len > 1])
    summary |= _stats("itl_s", [gap for m in metrics for gap in m.itl_s])
    summary |= _stats("p99_tbt_s", [m.p99_tbt_s for m in metrics])
    summary |= _stats("e2e_s", [m.e2e_s for m in metrics])
    return summary
