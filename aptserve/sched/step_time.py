"""How much step time the apt policies let hidden rows take: batch-aware pricing of the hidden cache."""
from __future__ import annotations

import math
from dataclasses import dataclass

from aptserve.request import Request


@dataclass(frozen=True, slots=True)
class StepTime:
    """Batch-aware pricing of the hidden cache. A hidden request re-projects its K/V in every step it is in, so
    its rows are offered only where the step-time model predicts both that
    - the steps stay within `fraction` of the planned gap of each request decoding (`allowance_s`,
      sched/tbt_allowance.py) and of the hidden request's own TBT SLO, with the running batch's decode (`decode_s`)
      and every hidden admission's re-projection in them, and
    - the batch's decode throughput does not fall: a request admitted hidden costs every step its own row and its
      re-projection, which must be no more than a request's share of the step it joins (`share_s`: the running
      batch's decode and the KV admissions beside it, per request; the fixed part of a step alone where nothing
      else runs). Where a step's fixed part (the weights read once for all rows) dominates, as with few long
      requests in a small memory, that holds; where re-projection costs more than a request's share of the step,
      hidden rows buy memory with more compute than the requests they admit bring, and those wait for KV."""

    fraction: float
    decode_s: float
    allowance_s: float
    num_running: int
    unlimited: bool = False  # NO_HIDDEN_TIME_LIMIT: offers every hidden option

    @property
    def shared_s(self) -> float:
        """Re-projection the running batch can take on in all."""
        return self.fraction * self.allowance_s - self.decode_s

    def share_s(self, kv_rows_s: float = 0.0, num_kv: int = 0) -> float:
        """A request's share of the step, with `num_kv` KV admissions costing `kv_rows_s` in it."""
        if self.unlimited:
            return math.inf
        return (self.decode_s + kv_rows_s) / max(1, self.num_running + num_kv)

    def limit_s(self, request: Request) -> float:
        """... and with `request` decoding in the batch too."""
        return min(self.shared_s, self.fraction * request.tbt_slo_s - self.decode_s)

    def offers_hidden(self, recompute_s: float, row_s: float) -> bool:
        """Whether a request whose hidden rows add `recompute_s` to each step, beside its row's `row_s`, may be
        admitted hidden at all (the step's shared time and the throughput test, on their own)."""
        return recompute_s <= self.shared_s and recompute_s + row_s <= self.share_s()


NO_HIDDEN_TIME_LIMIT = StepTime(1.0, 0.0, math.inf, 0, unlimited=True)  # no limit: where no hidden option is priced
