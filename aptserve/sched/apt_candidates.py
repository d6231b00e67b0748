"""Which waiting requests the apt greedy prices in a step: all of them while the queue is short, else the
`limit` that rank first in its walk, found from the shape index of the waiting queue (waiting.py) in time that
does not grow with the queue.

The greedy (apt.solve) walks steps by gain per unit, each item's first step before its other, and stops at the
first that does not fit. Ranking items by their first step's gain, the top `limit` are the candidates. If the walk
over the whole queue would stop before the last candidate's first step, every step it takes and the one it stops
at belong to candidates, so the greedy over the candidates chooses exactly the same (the double check included).
That is the memory-bound case, where a queue grows. Otherwise (memory for more than `limit` requests) the greedy
chooses among the candidates only; tests/test_apt_candidates.py and benchmarks/scheduler_cost.py measure what that
costs in value. Units are counted without the prefix cache here (a hit only makes a request cheaper); candidates
are priced with it.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable

from aptserve.request import Request
from aptserve.sched.apt import first_gain, options
from aptserve.sched.waiting import ShapeBucket, WaitingQueue

# Requests the greedy prices at most per step, beside twice the batch's free slots: enough to fill them.
MIN_CANDIDATES = 64

# (kv units, hidden units or None, hidden cost: U * alpha * blocks) of a shape whose hidden option is offered.
ShapePrice = tuple[int, int | None, float]


def waiting_candidates(queue: WaitingQueue, now: float, limit: int, budget: int, violator_weight: float,
                       shape_price: Callable[[ShapeBucket], ShapePrice]) -> list[Request]:
    """The waiting requests to price, in queue order: all if there are at most `limit`, else the `limit` whose
    first step the greedy ranks first (gain per unit, then queue order), of those with an option that fits
    `budget`. `shape_price`: a shape's units and hidden cost, as the policy prices a request of that shape."""
    if len(queue) <= limit:
        return list(queue)
    heads: list[tuple[float, int, int, int, bool]] = []  # (-gain, queue order, bucket number, index, past SLO)
    parts: list[tuple[ShapeBucket, ShapePrice, int]] = []
    for bucket in queue.buckets.values():
        price = shape_price(bucket)
        if min(price[0], price[1] or price[0]) > budget:  # no option of this shape fits: none is pushed
            continue
        num_past = bucket.num_past_slo(now)
        parts.append((bucket, price, num_past))
        for past, index in ((True, 0), (False, num_past)):
            if index < (num_past if past else len(bucket.entries)):
                _push(heads, parts, len(parts) - 1, index, past, now, budget, violator_weight)
    chosen: list[tuple[int, Request]] = []
    while heads and len(chosen) < limit:
        _, order, number, index, past = heapq.heappop(heads)
        bucket, _, num_past = parts[number]
        chosen.append((order, bucket.entries[index][2]))
        if index + 1 < (num_past if past else len(bucket.entries)):
            _push(heads, parts, number, index + 1, past, now, budget, violator_weight)
    chosen.sort(key=lambda entry: entry[0])
    return [request for _, request in chosen]


def _push(heads: list, parts: list, number: int, index: int, past: bool, now: float, budget: int,
          violator_weight: float) -> None:
    """Put a shape's request at `index` among the heads, ranked by its first step's gain (as apt.solve would)."""
    bucket, (kv_units, hidden_units, hidden_cost), _ = parts[number]
    last_token_s, order, _ = bucket.entries[index]
    value = (violator_weight if past else 1.0) * (now - last_token_s)
    if past or hidden_units is None:
        gain = first_gain(*options(kv_units, value, None, None, budget))
    else:
        gain = first_gain(*options(kv_units, value, hidden_units, value - hidden_cost, budget))
    if gain is not None:  # without an option, neither it nor those after it (worth less) can be chosen
        heapq.heappush(heads, (-gain, order, number, index, past))
