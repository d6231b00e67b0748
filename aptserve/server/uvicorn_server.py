"""uvicorn with a drain (on SIGTERM new requests get 503 while running ones finish, up to a timeout) and the
connection guards (limits, a deadline for request heads)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time

import uvicorn
from fastapi import FastAPI

from aptserve.server.async_llm import AsyncLLM
from aptserve.server.guards import BoundedLoopErrorLog, HeadDeadlineH11Protocol, raise_open_file_limit

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on SIGTERM/SIGINT: new requests get 503 while running ones finish, up to
    `shutdown_timeout_s`; then each request still open gets an error (a stream: an error event and [DONE]) and
    it exits; `num_cut` says how many were cut. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.shutdown_timeout_s = shutdown_timeout_s
        self._drain_deadline: float | None = None
        self.num_cut = 0

    @property
    def engine(self) -> AsyncLLM:
        return self.config.app.state.engine

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:  # unlike uvicorn's, do not re-raise the signal: a drained server exits cleanly
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain_deadline is not None:
            self.should_exit = self.force_exit = True
            return
        logger.info("draining: refusing new requests, finishing %d (up to %.0f s)",
                    self.engine.num_unfinished, self.shutdown_timeout_s)
        self.engine.draining = True
        self._drain_deadline = time.monotonic() + self.shutdown_timeout_s

    async def on_tick(self, counter: int) -> bool:
        if self.engine.dead_reason is not None:  # nothing more can be served: exit (cmd_serve says non-zero)
            self.should_exit = True
        if self._drain_deadline is not None and not self.should_exit:
            if self.engine.num_unfinished and time.monotonic() >= self._drain_deadline:
                self.num_cut = self.engine.cut_unfinished()
            if self.engine.num_unfinished == 0:  # their handlers write the last bytes during uvicorn's grace
                self.should_exit = True
        return await super().on_tick(counter)

    async def startup(self, sockets=None) -> None:
        BoundedLoopErrorLog().install(asyncio.get_running_loop())
        await super().startup(sockets)


def build_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout_s: float = 30.0,
                 access_log: bool = True, log_level: str = "info", limit_concurrency: int | None = 4096,
                 timeout_keep_alive: float = 5.0, header_read_timeout: float = 10.0) -> DrainingServer:
    """A uvicorn server for the app; `.run()` serves until a signal (or `.handle_exit`) drains it."""
    raise_open_file_limit()
    # The drain already waited for (or cut) requests; uvicorn's own grace is only for their last bytes.
    config = uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level=log_level,
                            timeout_graceful_shutdown=5, http=HeadDeadlineH11Protocol,
                            limit_concurrency=limit_concurrency, timeout_keep_alive=timeout_keep_alive)
    config.header_read_timeout = header_read_timeout  # read by HeadDeadlineH11Protocol
    return DrainingServer(config, shutdown_timeout_s)
