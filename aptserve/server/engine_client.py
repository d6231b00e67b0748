"""What the routes need of the engine behind them, declared once: AsyncLLM (one engine core, in a thread or a
process of its own) and the cluster's ClusterEngine (replicas on Ray Serve) both satisfy it."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from aptserve.config import EngineConfig
from aptserve.inputs import InputProcessor
from aptserve.outputs import RequestOutput
from aptserve.sampling import SamplingParams
from aptserve.server.metrics import ServerMetrics


class ResponseStream(Protocol):
    """One request's outputs, read by the one handler serving it."""

    request_id: str
    finished: bool

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    def close(self) -> None:
        """Abort the request unless it finished (client gone, handler failed); safe to call twice."""


class EngineClient(Protocol):
    config: EngineConfig
    tokenizer: Any  # the served model's HF tokenizer
    input_processor: InputProcessor  # the door: checks and tokenizes
    metrics: ServerMetrics
    draining: bool  # set on SIGTERM: new requests get 503, running ones finish
    dead_reason: str | None  # why the engine stopped for good, or None

    @property
    def is_running(self) -> bool: ...

    @property
    def num_unfinished(self) -> int:
        """Requests added and not yet finished or aborted (what a drain waits for)."""

    def start(self) -> None:
        """On the event loop, when the app starts."""

    async def shutdown(self) -> None:
        """Stop the engine; requests still open get an error."""

    def check_capacity(self, num_requests: int = 1) -> None:
        """Raise unless `num_requests` (a request's n choices) can be queued now: InvalidRequestError (400) if they
        never could, EngineOverloadedError (503) if not now."""

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          ttft_slo_s: float | None = None, tbt_slo_s: float | None = None) -> ResponseStream:
        """Check, tokenize and queue a request; raises InvalidRequestError (400) or EngineOverloadedError (503)."""

    def cut_unfinished(self) -> int:
        """End every open request now with a shutdown error (the drain ran out of time); returns how many."""
