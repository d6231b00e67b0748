"""The waiting queue: a deque's operations (append, appendleft, remove, [0], iteration in queue order), remove in
constant time, plus an index by shape that lets the apt greedy find its best candidates without pricing every
waiting request each step.

A waiting request's value is a function of `now` alone through its pending time: its tokens, last token time and SLO
do not change while it waits. Requests of one shape (the same number of blocks and the same SLO) therefore keep one
order, oldest first, at every `now`: the oldest are worth most per unit, and those past their SLO are a prefix of it
(`now - t > slo` is monotone in t). The index keeps each shape's requests sorted so; a step reads each shape's
head instead of every request, and counts the requests past their SLO by bisection.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterator

from aptserve.cache.geometry import cdiv
from aptserve.request import Request

Shape = tuple[int, float]  # (blocks, SLO seconds that applies while it waits)


class ShapeBucket:
    """The waiting requests of one shape, oldest first: entries (last_token_s, queue order, request)."""

    __slots__ = ("num_blocks", "slo_s", "entries", "_past_at")

    def __init__(self, num_blocks: int, slo_s: float) -> None:
        self.num_blocks, self.slo_s = num_blocks, slo_s
        self.entries: list[tuple[float, int, Request]] = []
        self._past_at: tuple[float, int] | None = None  # (now, count): a step asks twice at one `now`

    def num_past_slo(self, now: float) -> int:
        """How many of them are past their SLO at `now` (the same test as Request.is_past_slo: `now - t > slo`
        is `t - now < -slo` exactly, since a floating-point difference negates exactly)."""
        if self._past_at is None or self._past_at[0] != now:
            self._past_at = now, bisect.bisect_left(self.entries, -self.slo_s, key=lambda e: e[0] - now)
        return self._past_at[1]

    def changed(self) -> None:
        self._past_at = None


class WaitingQueue:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        # The queue in two insertion-ordered dicts by request id: those put at the front (newest first) and those
        # put at the back (oldest first), so a request leaves from the middle in constant time.
        self._front_part: dict[str, Request] = {}
        self._back_part: dict[str, Request] = {}
        # Queue order as numbers: append takes one above the back, appendleft one below the front, so sorting by
        # them gives the deque's order (ties between equal gains break by it, as the greedy's input order).
        self._order: dict[str, tuple[int, Shape]] = {}
        self._front, self._back = 0, 0
        self.buckets: dict[Shape, ShapeBucket] = {}
        self.sum_last_token_s = 0.0  # of every waiting request: the total pending time is len * now - this

    # --- the deque's operations ----------------------------------------------------------------
    def append(self, request: Request) -> None:
        self._back += 1
        self._back_part[request.request_id] = request
        self._index(request, self._back)

    def appendleft(self, request: Request) -> None:
        self._front -= 1
        self._front_part[request.request_id] = request
        self._index(request, self._front)

    def remove(self, request: Request) -> None:
        order, shape = self._order.pop(request.request_id)
        del (self._front_part if order < 0 else self._back_part)[request.request_id]
        bucket = self.buckets[shape]
        entries = bucket.entries
        entries.pop(bisect.bisect_left(entries, (request.last_token_s, order), key=lambda e: (e[0], e[1])))
        bucket.changed()
        if not entries:
            del self.buckets[shape]
        self.sum_last_token_s = self.sum_last_token_s - request.last_token_s if self._order else 0.0

    def __getitem__(self, index: int) -> Request:
        if index != 0:
            raise IndexError("the waiting queue is read at its front only")
        if self._front_part:
            return next(reversed(self._front_part.values()))
        if self._back_part:
            return next(iter(self._back_part.values()))
        raise IndexError("the waiting queue is empty")

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[Request]:
        yield from reversed(self._front_part.values())
        yield from self._back_part.values()

    def __contains__(self, request: Request) -> bool:
        return request.request_id in self._order  # ids are unique among the scheduler's requests

    # --- the index -----------------------------------------------------------------------------
    def order_of(self, request: Request) -> int:
        return self._order[request.request_id][0]

    def num_live(self, now: float) -> int:
        """Waiting requests not past their SLO at `now`."""
        return sum(len(b.entries) - b.num_past_slo(now) for b in self.buckets.values())

    def _index(self, request: Request, order: int) -> None:
        slo_s = request.tbt_slo_s if request.output_token_ids else request.ttft_slo_s
        shape = (cdiv(request.num_tokens, self.block_size), slo_s)
        self._order[request.request_id] = (order, shape)
        bucket = self.buckets.get(shape)
        if bucket is None:
            bucket = self.buckets[shape] = ShapeBucket(*shape)
        bisect.insort(bucket.entries, (request.last_token_s, order, request), key=lambda e: (e[0], e[1]))
        bucket.changed()
        self.sum_last_token_s += request.last_token_s
