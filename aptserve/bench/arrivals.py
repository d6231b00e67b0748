"""Request arrival times: gamma inter-arrivals with a mean rate and a coefficient of variation (CV).

Apt-Serve's and Vidur's parameterisation: shape = 1/cv^2, scale = 1/(rate * shape), so the gaps have mean 1/rate
and CV = cv; cv = 1 is Poisson, cv > 1 burstier, cv = 0 evenly spaced. vLLM's `--burstiness b` is the shape
itself, so b = 1/cv^2 and cv = 1/sqrt(b). Unlike vLLM, the offsets are not rescaled to end at N/rate.
"""
from __future__ import annotations

import math

import numpy as np


def burstiness_to_cv(burstiness: float) -> float:
    """vLLM's `--burstiness b` (the gamma shape) as a CV."""
    return 1.0 / math.sqrt(burstiness)


def cv_to_burstiness(cv: float) -> float:
    """A CV as vLLM's `--burstiness` (inf for cv = 0: evenly spaced)."""
    return math.inf if cv == 0 else 1.0 / cv**2


def gamma_send_offsets_s(num_requests: int, rate: float, cv: float = 1.0,
                         seed: int | np.random.Generator = 0) -> list[float]:
    """Send times (seconds after the start) of `num_requests`: the first at 0, then gamma gaps.

    `rate` is the mean rate in requests/s; rate = inf sends everything at 0.
    """
    if num_requests < 0 or rate <= 0 or cv < 0:
        raise ValueError(f"need num_requests >= 0, rate > 0 and cv >= 0; got {num_requests}, {rate}, {cv}")
    num_gaps = max(num_requests - 1, 0)
    if math.isinf(rate):
        gaps_s = np.zeros(num_gaps)
    elif cv == 0:
        gaps_s = np.full(num_gaps, 1.0 / rate)
    else:
        shape = 1.0 / cv**2
        gaps_s = np.random.default_rng(seed).gamma(shape, 1.0 / (rate * shape), size=num_gaps)
    return np.concatenate([[0.0], np.cumsum(gaps_s)])[:num_requests].tolist()
