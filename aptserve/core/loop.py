"""The step loop every served engine core runs, in a thread of the server (ThreadCore) or alone in the engine-core
process (process.py): take the front end's messages, step while there is work, hand each step's outputs back.

One failure policy wherever it runs:
- a request whose forward pass or sampling fails fails alone (EngineCore.step re-runs its batch in halves);
- a step that fails outside that (a bug in scheduling or bookkeeping) fails the requests in flight, each with the
  error, and the loop goes on serving new ones;
- the loop ends only on what it cannot isolate (failing those requests fails too, or its own plumbing breaks); the
  requests still in the core are aborted and its owner reports the loop dead (the front end fails their streams).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from aptserve.core.engine_core import EngineCore
from aptserve.core.heap import HeapTrimmer
from aptserve.core.messages import AbortRequests, AddRequest, CoreInput, EngineCoreOutputs, PollSnapshot, Shutdown

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # while idle, how long to wait for a message before checking keep_going again

# `receive(timeout_s)`: the messages waiting, after up to timeout_s for the first.
Receive = Callable[[float], Iterable[CoreInput]]
Emit = Callable[[EngineCoreOutputs], None]


class EngineLoop:
    def __init__(self, core: EngineCore, emit: Emit) -> None:
        self.core = core
        self.emit = emit
        self.heap = HeapTrimmer()

    def run(self, receive: Receive, keep_going: Callable[[], bool] = lambda: True) -> None:
        """Serve until a Shutdown message, or until keep_going() is False (e.g. the front end is gone)."""
        try:
            while True:
                timeout_s = 0.0 if self.core.has_unfinished_requests() else IDLE_WAIT_S
                for message in receive(timeout_s):
                    if isinstance(message, Shutdown):
                        return
                    self.apply(message)
                if not keep_going():
                    logger.warning("the front end is gone; stopping")
                    return
                if self.core.has_unfinished_requests():
                    self.step()
                    self.heap.stepped()
                self.heap.maybe_trim(idle=not self.core.has_unfinished_requests())
        finally:
            self.core.abort_requests(list(self.core.scheduler.requests))

    def apply(self, message: CoreInput) -> None:
        if isinstance(message, AddRequest):
            self._add(message)
        elif isinstance(message, AbortRequests):
            self.core.abort_requests(message.request_ids)
            if (idle := self.core.idle_stats()) is not None:
                self.emit(idle)
        elif isinstance(message, PollSnapshot):
            self.emit(EngineCoreOutputs(self.core.clock.now(), snapshot=self.core.snapshot(), stats=self.core.stats()))

    def _add(self, message: AddRequest) -> None:
        request_id = message.request.request_id
        try:
            self.core.add_request(message.request)
        except Exception as exc:  # the front end checked it; a refusal here is that request's alone
            logger.exception("could not add %s", request_id)
            self.emit(self.core.refusal(request_id, f"{type(exc).__name__}: {exc}"))

    def step(self) -> None:
        try:
            outputs = self.core.step()
        except Exception as exc:  # not a request's failure (step() isolates those): fail what is in flight, go on
            logger.exception("engine step failed; failing the %d requests in flight", len(self.core.scheduler.requests))
            outputs = self.core.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
        if outputs is not None:
            self.emit(outputs)
