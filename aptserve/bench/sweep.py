"""Effective throughput: the highest request rate whose SLO attainment reaches a target (0.9 by default).

`measure(rate) -> attainment` runs one benchmark point; everything here only decides which rates to measure.
Bisection assumes attainment does not grow with the rate (true up to noise); the sweep does not.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Measure = Callable[[float], float]


@dataclass(frozen=True)
class SweepResult:
    """`best_rate` is None when no probed rate reached the target; `probes` are (rate, attainment) in probe order."""
    best_rate: float | None
    probes: list[tuple[float, float]]


class _Prober:
    """Calls `measure` once per rate and remembers every probe."""

    def __init__(self, measure: Measure, target: float):
        self.measure, self.target = measure, target
        self.attainments: dict[float, float] = {}

    def passes(self, rate: float) -> bool:
        if rate not in self.attainments:
            self.attainments[rate] = float(self.measure(rate))
        return self.attainments[rate] >= self.target

    def result(self) -> SweepResult:
        passing = [rate for rate, attainment in self.attainments.items() if attainment >= self.target]
        return SweepResult(max(passing, default=None), list(self.attainments.items()))


def sweep_rates(measure: Measure, rates: Sequence[float], target: float = 0.9,
                stop_at_first_failure: bool = False) -> SweepResult:
    """Measure each rate in ascending order; the best is the highest rate that passes."""
    prober = _Prober(measure, target)
    for rate in sorted(rates):
        if not prober.passes(rate) and stop_at_first_failure:
            break
    return prober.result()


def bisect_rate(measure: Measure, lo: float, hi: float, target: float = 0.9, tol: float | None = None,
                max_num_probes: int = 10) -> SweepResult:
    """Bisect [lo, hi] until the passing and failing rates are within `tol` (default (hi - lo) / 32) or
    `max_num_probes` measurements are spent. If lo fails the best is None; if hi passes the best is hi."""
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    prober = _Prober(measure, target)
    if prober.passes(lo) and not prober.passes(hi):
        _bisect(prober, lo, hi, (hi - lo) / 32 if tol is None else tol, max_num_probes)
    return prober.result()


def sweep_then_bisect(measure: Measure, rates: Sequence[float], target: float = 0.9, tol: float | None = None,
                      max_num_probes: int = 16) -> SweepResult:
    """A coarse ascending sweep (stopping at the first failure), then bisection between the last passing rate and
    that failure. `tol` defaults to 1/16 of that bracket; `max_num_probes` counts the sweep's probes too."""
    prober = _Prober(measure, target)
    passing_rate = None
    for rate in sorted(rates)[:max_num_probes]:
        if not prober.passes(rate):
            if passing_rate is not None:
                _bisect(prober, passing_rate, rate, (rate - passing_rate) / 16 if tol is None else tol,
                        max_num_probes)
            break
        passing_rate = rate
    return prober.result()


def _bisect(prober: _Prober, passing_rate: float, failing_rate: float, tol: float, max_num_probes: int) -> None:
    while failing_rate - passing_rate > tol and len(prober.attainments) < max_num_probes:
        mid = (passing_rate + failing_rate) / 2
        if prober.passes(mid):
            passing_rate = mid
        else:
            failing_rate = mid


def interpolate_crossing(rates: Sequence[float], attainments: Sequence[float], target: float = 0.9) -> float | None:
    """The rate where the attainment curve first falls below `target`, linearly interpolated between the two
    probes around it (DistServe's `find_intersection`). None if it never falls below (the effective throughput is
    beyond the largest rate) or starts below (it is under the smallest)."""
    points = sorted(zip(rates, attainments))
    if not points or points[0][1] < target:
        return None
    for (rate0, attainment0), (rate1, attainment1) in zip(points, points[1:]):
        if attainment1 < target:  # attainment0 >= target here: earlier points all passed
            return rate0 + (attainment0 - target) * (rate1 - rate0) / (attainment0 - attainment1)
    return None
