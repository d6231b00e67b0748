"""A bystander stream: one streaming completion, in a thread, that records the largest gap between its events,
to show whether something else done to a server (a probe, a huge request) stalls the clients it already serves."""
from __future__ import annotations

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
