"""A bystander stream: one streaming completion, in a thread, that records the largest gap between its events,
to show whether something else done to a server (a probe, a huge request) stalls the clients it already serves.
BystanderProcess runs it in a process of its own, so the prober's own threads (the GIL) cannot delay its reads."""
from __future__ import annotations

import multiprocessing
import queue
import threading
import time

import httpx


class Bystander(threading.Thread):
    def __init__(self, base_url: str, body: dict, timeout_s: float = 300) -> None:
        super().__init__(daemon=True)
        self.base_url, self.body, self.timeout_s = base_url, {**body, "stream": True}, timeout_s
        self.num_events, self.largest_gap_s, self.started = 0, 0.0, threading.Event()

    def run(self) -> None:
        with httpx.stream("POST", f"{self.base_url}/v1/completions", json=self.body, timeout=self.timeout_s,
                          trust_env=False) as response:
            last = None
            for line in response.iter_lines():
                if line.startswith("data: "):
                    now = time.perf_counter()
                    if last is not None:
                        self.largest_gap_s = max(self.largest_gap_s, now - last)
                    last, self.num_events = now, self.num_events + 1
                    self.started.set()


class BystanderProcess:
    """A Bystander in a process of its own (same attributes once joined: largest_gap_s, num_events)."""

    def __init__(self, base_url: str, body: dict, timeout_s: float = 300) -> None:
        context = multiprocessing.get_context("spawn")
        self.started, self._results = context.Event(), context.Queue()
        self._process = context.Process(target=_run_bystander, daemon=True,
                                        args=(base_url, body, timeout_s, self.started, self._results))
        self.largest_gap_s, self.num_events = 0.0, 0

    def start(self) -> None:
        self._process.start()

    def join(self, timeout_s: float | None = None) -> None:
        try:
            self.largest_gap_s, self.num_events = self._results.get(timeout=timeout_s)
        except queue.Empty:  # still streaming: what it saw is unknown, so report it as stalled throughout
            self.largest_gap_s = float("inf")
        self._process.join(1)
        if self._process.is_alive():
            self._process.kill()


def _run_bystander(base_url: str, body: dict, timeout_s: float, started, results) -> None:
    bystander = Bystander(base_url, body, timeout_s)
    bystander.started = started
    try:
        bystander.run()
    finally:
        results.put((bystander.largest_gap_s, bystander.num_events))
