"""How long a gap a decoding request can take next and still meet its P99 TBT SLO.

The paper's rule scores a request by the 99th percentile (linear interpolation, numpy's default) of its gaps
between tokens. Over N gaps sorted ascending, P99 sits at index 0.99 * (N - 1) = i + f: it is g[i] + f (g[i+1] -
g[i]), so the N - 2 - i largest gaps do not enter it at all and the next one enters with weight f. By that rule
alone, a request whose gaps have been short could take N - 2 - i gaps of any length. The scheduler does not plan
them: a stream that stalls longer than its client's SLO is what a user sees, whatever the P99 says, and on a CPU
a longer step buys almost no throughput (prefill time is close to linear in the chunk). So while a request can
still meet its SLO, its next gap is planned within the SLO, and the free gaps are a margin for what the step-time
model mispredicts. Once a slow gap has entered the P99 with weight f, the next may take only what keeps
g[i] + f (g[i+1] - g[i]) within the SLO. A request already past that point has missed its SLO whatever happens
next, but its stream is still planned within the SLO: freed of any bound, two mispredicted steps (a prompt
scored for its logprobs, say) were enough to let its next gaps run to 1.3 s, and a client sees a stalled stream,
not a percentile.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from aptserve.request import Request

UNBOUNDED_S = math.inf


def tbt_allowance_s(num_gaps: int, num_slow_gaps: int, max_gap_s: float, tbt_slo_s: float) -> float:
    """The longest next gap (seconds) to plan for a request that will have `num_gaps` gaps in all and has had
    `num_slow_gaps` above its SLO so far, the longest `max_gap_s`."""
    if num_gaps == 0:
        return UNBOUNDED_S
    if num_gaps == 1:
        return tbt_slo_s  # a single gap is its own P99
    position = 0.99 * (num_gaps - 1)
    index = int(position)
    weight = position - index
    num_free = num_gaps - 1 - index - (weight > 0)  # slow gaps that never enter the P99
    if num_slow_gaps <= num_free:  # the free gaps (and the one that would enter with `weight`) are margin only
        return tbt_slo_s
    if weight > 0 and num_slow_gaps == num_free + 1 and weight * max_gap_s <= tbt_slo_s:
        return (tbt_slo_s - weight * max_gap_s) / (1 - weight)  # the slowest so far enters with `weight`
    return tbt_slo_s  # its P99 is already above the SLO; its stream still should not stall past it


def next_gap_allowance_s(decoding: Sequence[Request], now: float) -> float:
    """How long from `now` the next step may take within every decoding request's planned gap (inf: none binds)."""
    return min(tbt_allowance_s(r.sampling_params.max_tokens - 1, r.num_slow_gaps, r.max_gap_s, r.tbt_slo_s)
               - (now - r.last_token_s) for r in decoding)
