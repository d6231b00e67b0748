"""How long a gap a decoding request can still take without missing its P99 TBT SLO.

The paper's rule scores a request by the 99th percentile (linear interpolation, numpy's default) of its gaps
between tokens. Over N gaps sorted ascending, P99 sits at index 0.99 * (N - 1) = i + f: it is g[i] + f (g[i+1] -
g[i]), so the N - 2 - i largest gaps do not enter it at all and the next one enters with weight f. A request whose
other gaps are short (`typical_gap_s`) can therefore take N - 2 - i slow gaps of any length, then one more of at
most typical + (SLO - typical) / f, and after that none above the SLO. A request that is already past that point
has missed its SLO whatever happens next, and constrains nothing.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from aptserve.request import Request

UNBOUNDED_S = math.inf


def tbt_allowance_s(num_gaps: int, num_slow_gaps: int, max_gap_s: float, tbt_slo_s: float,
                    typical_gap_s: float) -> float:
    """The longest next gap (seconds) that keeps P99 TBT under `tbt_slo_s`, for a request that will have
    `num_gaps` gaps in all and has had `num_slow_gaps` above the SLO so far, the longest `max_gap_s`."""
    if num_gaps < 2:
        return UNBOUNDED_S if num_gaps == 0 else tbt_slo_s  # a single gap is its own P99
    position = 0.99 * (num_gaps - 1)
    index = int(position)
    weight = position - index
    num_free = num_gaps - 1 - index - (weight > 0)  # slow gaps that never enter the P99
    if num_slow_gaps < num_free:
        return UNBOUNDED_S
    if weight > 0 and num_slow_gaps == num_free:  # the next slow gap would enter with `weight`
        return typical_gap_s + (tbt_slo_s - typical_gap_s) / weight
    if weight > 0 and num_slow_gaps == num_free + 1:  # the slowest so far enters with `weight`
        return max(0.0, (tbt_slo_s - weight * max_gap_s) / (1 - weight))
    if num_slow_gaps == num_free:
        return tbt_slo_s
    return UNBOUNDED_S  # its P99 is already above the SLO: nothing it sees now changes that


def next_gap_allowance_s(decoding: Sequence[Request], typical_gap_s: float, now: float) -> float:
    """How long from `now` the next step may take before some decoding request's P99 TBT SLO is lost (inf: none
    binds)."""
    return min(tbt_allowance_s(r.sampling_params.max_tokens - 1, r.num_slow_gaps, r.max_gap_s, r.tbt_slo_s,
                               typical_gap_s) - (now - r.last_token_s) for r in decoding)
