"""GrammarGate: a structured-output request reaches the scheduler only once its grammar is compiled, so no step
ever compiles one (a large grammar takes seconds, and every running stream would wait for it).

The front end has compiled the constraint already to check it (a refusal there is a 400); in its own process the
engine core compiles it again, from its cache when the text was seen before, else in one worker thread while the
request waits here and the other streams keep stepping. When the compile is done, the request's matcher goes to
the runner's GrammarBank and the request to the scheduler; its arrival time is unchanged, so the wait counts in
its TTFT and its pending time.
"""
from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

from aptserve.request import Request

# One compile at a time: it is CPU work beside the forward pass.
NUM_WORKERS = 1


class GrammarGate:
    def __init__(self, bank) -> None:
        """`bank`: the runner's GrammarBank (its `compiler` compiles; `add` takes a request's grammar)."""
        self.bank = bank
        self._pool = concurrent.futures.ThreadPoolExecutor(NUM_WORKERS, thread_name_prefix="aptserve-grammar")
        self._waiting: dict[str, tuple[Request, concurrent.futures.Future]] = {}  # insertion (arrival) order
        # One compile per constraint however many requests (n choices) wait for it.
        self._compiling: dict[object, concurrent.futures.Future] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def request_ids(self) -> list[str]:
        return list(self._waiting)

    def admit(self, request: Request) -> bool:
        """True when the request may go to the scheduler now (no constraint, or its grammar is compiled); else
        it waits here for `ready`. Raises InvalidRequestError for a constraint the compiler refused before."""
        structured = request.sampling_params.structured
        if structured is None:
            return True
        compiled = self.bank.compiler.cached(structured)
        if compiled is not None:
            self.bank.add(request.request_id, compiled)
            return True
        future = self._compiling.get(structured)
        if future is None:
            future = self._compiling[structured] = self._pool.submit(self.bank.compiler.compile, structured)
            future.add_done_callback(lambda _: self._compiling.pop(structured, None))
        self._waiting[request.request_id] = (request, future)
        return False

    def ready(self, on_failed: Callable[[str, str], None]) -> list[Request]:
        """The waiting requests whose grammar is now compiled, in arrival order, their matchers given to the
        bank; those whose compile failed are dropped and reported to on_failed(request_id, why)."""
        done = [(request_id, request, future) for request_id, (request, future) in self._waiting.items()
                if future.done()]
        admitted = []
        for request_id, request, future in done:
            del self._waiting[request_id]
            try:
                self.bank.add(request_id, future.result())
            except Exception as exc:  # the front end compiled it; only a difference between processes gets here
                on_failed(request_id, f"{type(exc).__name__}: {exc}")
            else:
                admitted.append(request)
        return admitted

    def wait(self, timeout_s: float) -> None:
        """Block until a compile finishes or timeout_s passes (for a loop with nothing else to run)."""
        futures = [future for _, future in self._waiting.values()]
        if futures:
            concurrent.futures.wait(futures, timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)

    def abort(self, request_ids: list[str]) -> None:
        """Drop waiting requests (their compiles finish into the cache, where the next request may use them)."""
        for request_id in request_ids:
            self._waiting.pop(request_id, None)
