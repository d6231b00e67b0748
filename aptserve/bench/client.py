"""An open-loop streaming client for any OpenAI-compatible server (aptserve, vLLM, SGLang).

Each request is sent at its offset from the start, streamed over SSE, and timed with `time.perf_counter` at every
event that carries text: one timestamp per token-bearing event, as Apt-Serve's and vLLM's clients do. A request
that fails (HTTP error, error event, broken stream, timeout) becomes a failed `RequestRecord`; the run goes on.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence

import httpx
from tqdm.auto import tqdm

from aptserve.bench.datasets import TraceRequest
from aptserve.bench.metrics import RequestRecord


def endpoint_url(base_url: str, api: str) -> str:
    """`http://host:port` or `http://host:port/v1` -> the completions or chat completions URL."""
    if api not in ("completions", "chat"):
        raise ValueError(f"api must be 'completions' or 'chat', got {api!r}")
    base_url = base_url.rstrip("/")
    base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
    return base_url + ("/completions" if api == "completions" else "/chat/completions")


def request_payload(request: TraceRequest, model: str, api: str, ignore_eos: bool = True,
                    send_token_ids: bool = False) -> dict:
    """The JSON body: greedy, exactly `output_len` tokens when `ignore_eos` (an extension vLLM accepts too), and a
    final usage chunk so multi-token events can be detected. Chat prompts get the server's chat template, so the
    server sees more prompt tokens than `prompt_len`."""
    payload = {"model": model, "max_tokens": request.output_len, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    if api == "chat":
        payload["messages"] = [{"role": "user", "content": request.prompt}]
    elif send_token_ids and request.prompt_token_ids is not None:
        payload["prompt"] = list(request.prompt_token_ids)
    else:
        payload["prompt"] = request.prompt
    return payload


def _event_text(chunk: dict, api: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""  # the usage chunk
    if api == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def _stream_tokens(client: httpx.AsyncClient, url: str, payload: dict, api: str,
                         token_times_s: list[float]) -> int | None:
    """Stream one response, appending a timestamp per token-bearing event; returns the usage's token count."""
    num_usage_tokens = None
    async with client.stream("POST", url, json=payload) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {response.status_code}: {body[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, other SSE fields
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return num_usage_tokens
            chunk = json.loads(data)
            if chunk.get("error"):
                raise RuntimeError(f"error event: {chunk['error']}")
            if _event_text(chunk, api):
                token_times_s.append(time.perf_counter())
            num_usage_tokens = (chunk.get("usage") or {}).get("completion_tokens", num_usage_tokens)
    raise RuntimeError(f"stream ended before [DONE] after {len(token_times_s)} token events")


async def send_request(client: httpx.AsyncClient, url: str, payload: dict, api: str, prompt_len: int,
                       timeout_s: float) -> RequestRecord:
    """One streamed request, timed; never raises for a server-side failure."""
    token_times_s: list[float] = []
    send_s = time.perf_counter()
    error = None
    try:
        async with asyncio.timeout(timeout_s):
            num_usage_tokens = await _stream_tokens(client, url, payload, api, token_times_s)
    except Exception as exc:  # noqa: BLE001 - any failure of one request is that request's result
        error = f"{type(exc).__name__}: {exc}"
    if error is None and not token_times_s:
        error = "no tokens received"
    if error is not None:
        return RequestRecord(False, prompt_len, len(token_times_s), send_s, None, token_times_s, error)
    output_len = max(num_usage_tokens or 0, len(token_times_s))
    return RequestRecord(True, prompt_len, output_len, send_s, token_times_s[0], token_times_s)


async def _send_at(client: httpx.AsyncClient, url: str, payload: dict, api: str, prompt_len: int,
                   send_at_s: float, semaphore: asyncio.Semaphore | contextlib.nullcontext, timeout_s: float,
                   progress_bar: tqdm) -> RequestRecord:
    await asyncio.sleep(max(0.0, send_at_s - time.perf_counter()))
    async with semaphore:  # time spent waiting here is the client's, not counted in TTFT (as vLLM's client)
        record = await send_request(client, url, payload, api, prompt_len, timeout_s)
    progress_bar.update(1)
    return record


async def run_trace(base_url: str, model: str, trace: Sequence[TraceRequest], send_offsets_s: Sequence[float],
                    api: str = "completions", max_concurrency: int | None = None, timeout_s: float = 600.0,
                    ignore_eos: bool = True, progress: bool = True,
                    send_token_ids: bool = False) -> list[RequestRecord]:
    """Send `trace[i]` at `send_offsets_s[i]` seconds after the start; records come back in trace order.

    At most `max_concurrency` requests are in flight (None: no bound); each is failed after `timeout_s`. Time the
    call itself to get the run's duration for `summarize`.
    """
    if len(trace) != len(send_offsets_s):
        raise ValueError(f"{len(trace)} requests but {len(send_offsets_s)} send offsets")
    url = endpoint_url(base_url, api)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    # httpx pools 100 connections by default, which would silently cap the load; proxies would skew timings.
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, trust_env=False) as client:
        with tqdm(total=len(trace), disable=not progress, desc="requests") as progress_bar:
            start_s = time.perf_counter()
            return list(await asyncio.gather(*(
                _send_at(client, url, request_payload(request, model, api, ignore_eos, send_token_ids), api,
                         request.prompt_len, start_s + offset_s, semaphore, timeout_s, progress_bar)
                for request, offset_s in zip(trace, send_offsets_s))))
