"""SLO metrics on hand-made timestamps, gamma arrivals, rate sweeps, and the streaming client against a real
SSE server on 127.0.0.1 that emits a known token schedule."""
import asyncio
import json
import math
import socket

import numpy as np
import pytest

from aptserve.bench.arrivals import burstiness_to_cv, cv_to_burstiness, gamma_send_offsets_s
from aptserve.bench.client import endpoint_url, run_trace
from aptserve.bench.datasets import TraceRequest
from aptserve.bench.metrics import RequestRecord, meets_slo_paper, meets_slo_vllm, request_metrics, summarize
from aptserve.bench.sweep import bisect_rate, interpolate_crossing, sweep_rates, sweep_then_bisect


def record(token_times_s, send_s=0.0, output_len=None, prompt_len=10):
    return RequestRecord(True, prompt_len, len(token_times_s) if output_len is None else output_len, send_s,
                         token_times_s[0], list(token_times_s))


FAILED = RequestRecord(False, 10, 0, 0.0, None, [], "HTTP 500: boom")


# ---- metrics -------------------------------------------------------------------------------------------------

def test_request_metrics_from_token_times():
    metrics = request_metrics(record([1.5, 1.75, 2.25, 2.5], send_s=1.0))
    assert metrics.ttft_s == 0.5 and metrics.e2e_s == 1.5
    assert metrics.itl_s == [0.25, 0.5, 0.25]
    assert metrics.p99_tbt_s == pytest.approx(np.percentile([0.25, 0.5, 0.25], 99))
    assert metrics.mean_tpot_s == pytest.approx(1.0 / 3)


def test_one_token_output_has_no_gaps_and_passes_tbt():
    metrics = request_metrics(record([0.25]))
    assert metrics.itl_s == [] and metrics.p99_tbt_s == 0.0 and metrics.mean_tpot_s == 0.0
    assert meets_slo_paper(metrics, ttft_slo_s=0.5, tbt_slo_s=0.001)


def test_paper_rule_is_strict_and_vllm_rule_inclusive():
    metrics = request_metrics(record([0.5, 0.75, 1.0]))  # ttft 0.5, gaps 0.25, mean TPOT 0.25
    assert not meets_slo_paper(metrics, ttft_slo_s=0.5, tbt_slo_s=1.0)
    assert not meets_slo_paper(metrics, ttft_slo_s=1.0, tbt_slo_s=0.25)
    assert meets_slo_paper(metrics, ttft_slo_s=0.5 + 1e-9, tbt_slo_s=0.25 + 1e-9)
    assert meets_slo_vllm(metrics, ttft_slo_s=0.5, tpot_slo_s=0.25)
    assert not meets_slo_vllm(metrics, ttft_slo_s=0.5, tpot_slo_s=0.2)


def test_p99_tbt_catches_stalls_that_mean_tpot_hides():
    gaps_s = [0.0625] * 98 + [1.0] * 2  # with 100 gaps, P99 (linear) lands on the second-largest gap
    metrics = request_metrics(record(np.cumsum([0.25] + gaps_s).tolist()))
    assert metrics.p99_tbt_s == 1.0 and metrics.mean_tpot_s == pytest.approx(0.08125)
    assert meets_slo_vllm(metrics, 1.0, 0.2) and not meets_slo_paper(metrics, 1.0, 0.2)


def test_failed_request_has_no_metrics():
    with pytest.raises(ValueError, match="boom"):
        request_metrics(FAILED)


def test_summary_counts_failures_as_violations():
    records = [record([0.25, 0.5]), record([2.0, 2.25]), FAILED, record([0.25, 0.5, 3.0])]
    summary = summarize(records, ttft_slo_s=1.0, tbt_slo_s=1.0, duration_s=4.0)
    assert (summary["num_requests"], summary["completed"], summary["failed"]) == (4, 3, 1)
    assert summary["errors"] == {"HTTP 500: boom": 1}
    assert summary["attainment"] == 0.25  # only the first meets both
    assert summary["attainment_ttft_only"] == 0.5 and summary["attainment_tbt_only"] == 0.5
    assert summary["attainment_vllm"] == 0.25  # the last: TPOT (3.0 - 0.25) / 2 > 1.0
    assert summary["request_throughput"] == 0.75
    assert summary["output_token_throughput"] == 7 / 4.0
    assert summary["total_token_throughput"] == (30 + 7) / 4.0
    assert summary["mean_itl_s"] == pytest.approx(np.mean([0.25, 0.25, 0.25, 2.5]))
    assert summary["p50_ttft_s"] == 0.25
    json.dumps(summary)


def test_tpot_skips_one_token_outputs_and_tokens_per_event_are_noted():
    records = [record([0.5]), record([0.5, 1.0], output_len=3)]  # the second event carried two tokens
    summary = summarize(records, 1.0, 1.0, duration_s=1.0)
    assert summary["mean_tpot_s"] == 0.25
    assert summary["num_multi_token_event_requests"] == 1
    assert summary["num_output_tokens"] == 4


def test_summary_of_all_failures_and_of_nothing_is_json():
    summary = summarize([FAILED, FAILED], 1.0, 1.0, duration_s=2.0)
    assert summary["attainment"] == 0.0 and summary["attainment_vllm"] == 0.0 and summary["completed"] == 0
    assert summary["mean_ttft_s"] is None and summary["p99_itl_s"] is None and summary["request_throughput"] == 0
    empty = summarize([], 1.0, 1.0, duration_s=1.0)
    assert empty["attainment"] is None and empty["num_requests"] == 0
    json.dumps([summary, empty], allow_nan=False)
    with pytest.raises(ValueError, match="duration_s"):
        summarize([], 1.0, 1.0, duration_s=0.0)


# ---- arrivals ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gamma_gaps_have_the_mean_rate_and_cv(cv):
    offsets_s = gamma_send_offsets_s(40_000, rate=4.0, cv=cv, seed=0)
    gaps_s = np.diff(offsets_s)
    assert offsets_s[0] == 0.0 and len(offsets_s) == 40_000
    assert np.mean(gaps_s) == pytest.approx(0.25, rel=0.03)
    assert np.std(gaps_s) / np.mean(gaps_s) == pytest.approx(cv, rel=0.05)


def test_arrivals_are_seeded_and_rate_inf_sends_at_once():
    assert gamma_send_offsets_s(100, 2.0, 1.5, seed=3) == gamma_send_offsets_s(100, 2.0, 1.5, seed=3)
    assert gamma_send_offsets_s(100, 2.0, 1.5, seed=3) != gamma_send_offsets_s(100, 2.0, 1.5, seed=4)
    assert gamma_send_offsets_s(5, math.inf, 3.0) == [0.0] * 5
    assert gamma_send_offsets_s(4, 2.0, cv=0.0) == [0.0, 0.5, 1.0, 1.5]
    assert gamma_send_offsets_s(1, 2.0) == [0.0] and gamma_send_offsets_s(0, 2.0) == []
    with pytest.raises(ValueError):
        gamma_send_offsets_s(10, rate=0.0)


def test_vllm_burstiness_is_the_gamma_shape():
    assert burstiness_to_cv(0.25) == 2.0 and cv_to_burstiness(2.0) == 0.25
    assert burstiness_to_cv(1.0) == 1.0 and cv_to_burstiness(0.0) == math.inf


# ---- sweeps --------------------------------------------------------------------------------------------------

def falling_attainment(rate):
    """1.0 up to rate 3, then down by 0.5 per req/s: crosses 0.9 at rate 3.2."""
    return min(1.0, max(0.0, 1.0 - (rate - 3.0) / 2.0))


def test_bisection_finds_the_crossing_of_a_monotone_curve():
    result = bisect_rate(falling_attainment, lo=0.5, hi=10.0, tol=0.01, max_num_probes=20)
    assert 3.19 <= result.best_rate <= 3.2
    assert falling_attainment(result.best_rate) >= 0.9
    assert len(result.probes) <= 20 and result.probes[:2] == [(0.5, 1.0), (10.0, 0.0)]


def test_bisection_edges_and_probe_budget():
    assert bisect_rate(falling_attainment, lo=4.0, hi=8.0).best_rate is None
    assert bisect_rate(falling_attainment, lo=1.0, hi=3.0).best_rate == 3.0
    assert len(bisect_rate(falling_attainment, 0.5, 100.0, tol=1e-9, max_num_probes=5).probes) == 5


def test_sweep_picks_the_highest_passing_rate():
    attainment_by_rate = {1.0: 0.95, 2.0: 0.85, 3.0: 0.92, 4.0: 0.5}
    result = sweep_rates(attainment_by_rate.__getitem__, [4.0, 2.0, 3.0, 1.0])
    assert result.best_rate == 3.0 and [rate for rate, _ in result.probes] == [1.0, 2.0, 3.0, 4.0]
    early = sweep_rates(attainment_by_rate.__getitem__, [1.0, 2.0, 3.0, 4.0], stop_at_first_failure=True)
    assert early.best_rate == 1.0 and len(early.probes) == 2
    assert sweep_rates(attainment_by_rate.__getitem__, [2.0, 4.0]).best_rate is None


def test_sweep_then_bisect_refines_between_pass_and_fail_measuring_each_rate_once():
    measured = []

    def measure(rate):
        measured.append(rate)
        return falling_attainment(rate)

    result = sweep_then_bisect(measure, [1.0, 2.0, 4.0, 8.0], tol=0.02)
    assert 3.18 <= result.best_rate <= 3.2
    assert 8.0 not in measured and len(measured) == len(set(measured)) == len(result.probes)


def test_interpolate_crossing_is_linear_between_the_probes_around_target():
    assert interpolate_crossing([3.0, 1.0, 2.0], [0.85, 1.0, 0.95]) == pytest.approx(2.5)
    assert interpolate_crossing([1.0, 2.0], [0.99, 0.95]) is None  # never falls below the target
    assert interpolate_crossing([1.0, 2.0], [0.5, 0.4]) is None  # below from the start
    assert interpolate_crossing([1.0, 2.0], [0.9, 0.5], target=0.9) == 1.0


# ---- client against a real SSE server ------------------------------------------------------------------------

TTFT_S, GAP_S = 0.2, 0.1


async def serve_sse(reader, writer, received):
    """A minimal OpenAI-style streaming server. The prompt picks the behaviour; "ok" streams max_tokens tokens:
    the first after TTFT_S, then one per GAP_S, the last event carrying two tokens, then usage and [DONE]."""
    head = await reader.readuntil(b"\r\n\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in head.strip().split(b"\r\n")[1:])
    length = int(headers[b"content-length"])
    body = json.loads(await reader.readexactly(length))
    received.append(body)
    prompt = body.get("prompt") or body["messages"][0]["content"]
    if prompt == "http-500":
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\nboom")
    else:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        await stream_events(writer, body, prompt)
    await writer.drain()
    writer.close()


async def stream_events(writer, body, prompt):
    def send(chunk):
        writer.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    chat = "messages" in body
    if chat:
        send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})  # carries no token
    num_events = body["max_tokens"] - 1
    for i in range(num_events):
        await asyncio.sleep(TTFT_S if i == 0 else GAP_S)
        if prompt == "error-event" and i == 1:
            send({"error": {"message": "engine died"}})
            return
        if prompt == "cut" and i == 1:
            return  # the connection closes without [DONE]
        text = "ab" if i == num_events - 1 else "a"
        send({"choices": [{"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}]})
        await writer.drain()
    send({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": body["max_tokens"]}})
    writer.write(b"data: [DONE]\n\n")


async def run_against_server(trace, offsets_s, **options):
    received = []
    server = await asyncio.start_server(lambda r, w: serve_sse(r, w, received), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        records = await run_trace(f"http://127.0.0.1:{port}", "tiny", trace, offsets_s, progress=False, **options)
    return records, received


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_client_measures_the_servers_token_schedule(api):
    trace = [TraceRequest("ok", 3, 6)] * 3
    records, received = asyncio.run(run_against_server(trace, [0.0, 0.05, 0.1], api=api))
    assert all(r.ok and r.output_len == 6 and len(r.token_times_s) == 5 for r in records)
    for r in records:
        metrics = request_metrics(r)
        assert TTFT_S - 0.01 <= metrics.ttft_s <= TTFT_S + 0.3
        assert all(GAP_S - 0.01 <= gap <= GAP_S + 0.3 for gap in metrics.itl_s)
    send_offsets_s = [r.send_s - records[0].send_s for r in records]
    assert send_offsets_s == pytest.approx([0.0, 0.05, 0.1], abs=0.04)
    assert all(b["max_tokens"] == 6 and b["stream"] and b["ignore_eos"] and b["temperature"] == 0
               and b["stream_options"] == {"include_usage": True} for b in received)


def test_client_turns_server_failures_into_failed_records():
    trace = [TraceRequest(p, 3, 4) for p in ["http-500", "error-event", "cut", "ok"]]
    records, _ = asyncio.run(run_against_server(trace, [0.0] * 4))
    assert [r.ok for r in records] == [False, False, False, True]
    assert "HTTP 500" in records[0].error and "engine died" in records[1].error
    assert "before [DONE]" in records[2].error
    summary = summarize(records, 1.0, 1.0, duration_s=1.0)
    assert summary["failed"] == 3 and summary["attainment"] == 0.25


def test_client_times_out_and_survives_a_dead_server():
    records, _ = asyncio.run(run_against_server([TraceRequest("ok", 3, 20)], [0.0], timeout_s=0.5))
    assert not records[0].ok and "TimeoutError" in records[0].error
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    dead = asyncio.run(run_trace(f"http://127.0.0.1:{closed_port}/v1", "tiny", [TraceRequest("ok", 3, 4)] * 2,
                                 [0.0, 0.0], progress=False, timeout_s=5.0))
    assert [r.ok for r in dead] == [False, False] and all("Connect" in r.error for r in dead)


def test_client_bounds_concurrency():
    records, _ = asyncio.run(run_against_server([TraceRequest("ok", 3, 2)] * 3, [0.0] * 3, max_concurrency=1))
    spans = sorted((r.send_s, r.token_times_s[-1]) for r in records)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def test_endpoint_url_accepts_base_with_or_without_v1():
    assert endpoint_url("http://h:8000", "completions") == "http://h:8000/v1/completions"
    assert endpoint_url("http://h:8000/v1/", "chat") == "http://h:8000/v1/chat/completions"
    with pytest.raises(ValueError):
        endpoint_url("http://h:8000", "embeddings")
