"""AsyncLLMEngine: the (not thread-safe) LLMEngine in one background thread, in front of asyncio.

Handlers never touch the engine: adds and aborts go through a command queue that the engine thread drains
between steps, so the event loop never waits for a step. Each step's outputs go to per-request asyncio
queues via loop.call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import Callable

from aptserve.engine import LLMEngine
from aptserve.errors import AptServeError, EngineOverloadedError
from aptserve.outputs import RequestOutput
from aptserve.sampling import SamplingParams
from aptserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class RequestFailedError(AptServeError):
    """The engine gave up on this request (its batch failed, or the engine stopped); others go on."""


class ServerDrainingError(EngineOverloadedError):
    """The server is shutting down and accepts no new requests."""


class RequestStream:
    """The outputs of one request: pushed by the engine thread, read by the one handler serving it."""

    def __init__(self, request_id: str, engine: "AsyncLLMEngine") -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.error is not None:
            self.finished = True
            raise RequestFailedError(f"the engine failed on this request: {item.error}")
        self.finished = item.finished
        return item

    def close(self) -> None:
        """Abort the request unless it finished (client gone, handler failed); safe to call twice."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_queue_len: int = 1024, idle_wait_s: float = 0.5) -> None:
        self.engine = engine
        self.max_queue_len = max_queue_len
        self.idle_wait_s = idle_wait_s
        self.metrics = ServerMetrics(lambda: self.stats)
        self.stats = engine.stats()  # a snapshot taken by the engine thread; /metrics reads only this
        self.draining = False  # set on SIGTERM: new requests get 503, running ones finish
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- lifecycle (event loop) --------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="aptserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread; requests still running are aborted and their handlers get an error."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_unfinished(self) -> int:
        """Requests added and not yet finished or aborted (what a drain waits for)."""
        return len(self._streams)

    # --- requests (event loop) ---------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          ttft_slo_s: float | None = None, tbt_slo_s: float | None = None) -> RequestStream:
        """Queue a request; raises InvalidRequestError (400) or EngineOverloadedError (503) if refused."""
        if self.draining:
            raise ServerDrainingError("the server is shutting down; send the request to another replica")
        if not self.is_running:
            raise RequestFailedError("the engine is not running")
        stream = RequestStream(request_id, self)
        added = self._loop.create_future()
        self._submit(functools.partial(self._add, stream, prompt, params, self.engine.clock.now(),
                                       ttft_slo_s, tbt_slo_s, added))
        try:
            await added
        except asyncio.CancelledError:
            self.abort(request_id)  # the handler went away while the add was queued
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._submit(functools.partial(self._abort, request_id))

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # --- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._process_commands()
                if self.engine.has_unfinished_requests():
                    self._step()
                else:
                    self._wakeup.wait(self.idle_wait_s)
                    self._wakeup.clear()
                self.stats = self.engine.stats()
        except BaseException:  # a bug outside step(): say so, then fail every waiter below
            logger.exception("the engine loop died")
        finally:
            self._process_commands()
            self._abort_all("the server is shutting down" if self._stopping else "the engine loop died")

    def _process_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # an engine bug: fail what is in flight, keep serving new requests
            logger.exception("engine step failed; aborting %d requests", len(self._streams))
            self._abort_all(f"engine step failed: {type(exc).__name__}: {exc}")
            return
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if output.finished:
                self._streams.pop(output.request_id, None)
                self.metrics.observe_finished(output)
            if stream is not None:
                self._call_soon(stream.put, output)

    def _add(self, stream: RequestStream, prompt: str | list[int], params: SamplingParams,
             arrival_s: float, ttft_slo_s: float | None, tbt_slo_s: float | None,
             added: asyncio.Future) -> None:
        try:
            self._check_capacity()
            self.engine.add_request(prompt, params, stream.request_id, arrival_s=arrival_s,
                                    ttft_slo_s=ttft_slo_s, tbt_slo_s=tbt_slo_s)
        except Exception as exc:  # refused: nothing was queued; the handler turns it into 400/503/500
            self._call_soon(_set_future, added, exc)
            return
        self._streams[stream.request_id] = stream
        self._call_soon(_set_future, added, None)

    def _check_capacity(self) -> None:
        if self.draining:
            raise ServerDrainingError("the server is shutting down; send the request to another replica")
        num_waiting = self.engine.scheduler.num_waiting
        if num_waiting >= self.max_queue_len:
            raise EngineOverloadedError(
                f"the server is overloaded: {num_waiting} requests are already waiting (--max-queue-len "
                f"{self.max_queue_len}); retry later")

    def _abort(self, request_id: str) -> None:
        if request_id in self._streams:
            self.engine.abort_request(request_id)
            self._streams.pop(request_id, None)
            self.metrics.requests_finished.labels("abort").inc()

    def _abort_all(self, reason: str) -> None:
        for request_id, stream in list(self._streams.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("could not abort %s", request_id)
            self._streams.pop(request_id, None)
            self.metrics.requests_finished.labels("error").inc()
            self._call_soon(stream.put, RequestFailedError(reason))

    def _call_soon(self, callback: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: nobody is left to tell
            pass


def _set_future(future: asyncio.Future, exc: BaseException | None) -> None:
    if future.done():  # cancelled: the handler is gone (and queued an abort)
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
