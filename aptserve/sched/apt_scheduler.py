"""The Apt-Serve policies: value = pending time, memory priced per cache kind, the greedy of apt.py.

Value of a request: p = now - last_token_time (since arrival before its first token). Serving it
from the hidden cache costs every other live request the K/V recompute time: hidden value =
p - U * alpha * m, with m its blocks, U the waiting + running requests not yet past their SLO, and
alpha the seconds to re-project one block's K/V across all layers. A request past its SLO is worth
almost nothing (KV only), so it goes last and is the first to be preempted.

`apt` (the paper): each step is a prefill or a decode iteration, whichever side has waited longer in
total (or decode, if no prefill fits). Decode: the greedy over the running requests with the whole
pool decides who keeps decoding and in which kind; hidden requests keep decoding from their hidden
rows, KV-chosen hidden requests are converted in place when memory allows, the rest are preempted.
Prefill: the greedy over the waiting requests with the free memory.

`apt-chunked` (ours): every step does both, Sarathi-style: the running plan first (decodes never
stall), then the waiting plan with the memory left, its prompts chunked into the token budget.
"""
from __future__ import annotations

from aptserve.cache.manager import CacheKind
from aptserve.request import Request
from aptserve.sched.apt import KnapsackItem, solve
from aptserve.sched.base import Scheduler
from aptserve.sched.output import SchedulerOutput

# Value of a request past its SLO, relative to its pending time: tiny, but ordered by waiting time.
VIOLATOR_WEIGHT = 1e-6


class AptScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alpha_s = self.config.alpha_s or 0.0

    def _schedule(self, now: float, out: SchedulerOutput) -> None:
        num_live = self._num_live(now)
        prefill_plan = self._plan_waiting(now, num_live, self._free_units_for_waiting())
        running_p = sum(now - r.last_token_s for r in self.running)
        waiting_p = sum(now - r.last_token_s for r in self.waiting)
        if self.running and (running_p > waiting_p or not prefill_plan):
            self._schedule_running(now, num_live, out, self.config.max_num_batched_tokens)
        else:
            self._schedule_waiting(prefill_plan, out, self.config.max_num_batched_tokens, chunked=False)

    # --- values ------------------------------------------------------------------------------
    def _num_live(self, now: float) -> int:
        """U: requests in the system not yet past their SLO."""
        return sum(not r.is_past_slo(now) for r in self.waiting) + sum(not r.is_past_slo(now) for r in self.running)

    def _item(self, request: Request, now: float, num_live: int, num_tokens: int) -> KnapsackItem:
        pending_s = now - request.last_token_s
        kv_units = self.cache.num_units_for(CacheKind.KV, num_tokens)
        hidden_units = self.cache.num_units_for(CacheKind.HIDDEN, num_tokens)
        if request.is_past_slo(now):
            return KnapsackItem(request.req_id, kv_units, VIOLATOR_WEIGHT * pending_s + 1e-12)
        if self.hybrid_cache == "all-hidden":  # one option: the hidden table
            return KnapsackItem(request.req_id, hidden_units, pending_s + 1e-12)
        if self.hybrid_cache == "off" or hidden_units >= kv_units:
            return KnapsackItem(request.req_id, kv_units, pending_s + 1e-12)
        hidden_value = pending_s - num_live * self.alpha_s * self.cache.num_blocks(num_tokens)
        return KnapsackItem(request.req_id, kv_units, pending_s + 1e-12, hidden_units, hidden_value)

    def _kind(self, choice: str) -> CacheKind:
        return CacheKind.HIDDEN if choice == "hidden" or self.hybrid_cache == "all-hidden" else CacheKind.KV

    # --- running requests --------------------------------------------------------------------
    def _schedule_running(self, now: float, num_live: int, out: SchedulerOutput, budget: int) -> int:
        """Plan the running requests against the whole pool; returns the token budget left."""
        # A running request's footprint: rows for all its tokens (a decode writes the newest one).
        items = [self._item(r, now, num_live, r.num_tokens) for r in self.running]
        choices = solve(items, self.cache.num_units)
        for request in list(self.running):
            choice = choices[request.req_id]
            if choice is None:
                self._preempt(request, out)
            elif self._kind(choice) == CacheKind.HIDDEN and request.cache_kind == CacheKind.KV:
                self._preempt(request, out, next_kind=CacheKind.HIDDEN)  # KV -> HIDDEN by recompute
        for request in list(self.running):
            choice = choices[request.req_id]
            if choice and self._kind(choice) == CacheKind.KV and request.cache_kind == CacheKind.HIDDEN:
                self._convert_in_place(request, CacheKind.KV, out)  # stays HIDDEN if memory is short
        return self._schedule_running_chunks(out, budget)

    # --- waiting requests --------------------------------------------------------------------
    def _free_units_for_waiting(self) -> int:
        return max(0, self.cache.num_free_units - (self.watermark_units if self.running else 0))

    def _plan_waiting(self, now: float, num_live: int, free_units: int) -> list[tuple[Request, CacheKind]]:
        """Waiting requests the greedy admits into `free_units` and their kinds, best value per unit first."""
        items = {r.req_id: self._item(r, now, num_live, r.num_tokens) for r in self.waiting}
        choices = solve(items.values(), free_units)
        plan = [(r, self._kind(choices[r.req_id])) for r in self.waiting if choices[r.req_id] is not None]
        plan.sort(key=lambda entry: -items[entry[0].req_id].kv_value / items[entry[0].req_id].kv_units)
        return plan

    def _schedule_waiting(self, plan: list[tuple[Request, CacheKind]], out: SchedulerOutput, budget: int,
                          chunked: bool) -> None:
        for request, kind in plan:
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            num_new = min(request.num_tokens, budget) if chunked else request.num_tokens
            if not chunked and out.scheduled and num_new > budget:
                continue  # whole prompts only; a smaller one further down may still fit
            if not self.cache.allocate(request.req_id, kind, num_new):
                continue
            request.cache_kind = kind
            self._admit(request)
            self._schedule_tokens(out, request, num_new)
            budget = max(0, budget - num_new)


class AptChunkedScheduler(AptScheduler):
    def _schedule(self, now: float, out: SchedulerOutput) -> None:
        num_live = self._num_live(now)
        num_preempted = len(out.preempted_req_ids)
        budget = self.config.max_num_batched_tokens
        if self.running:
            budget = self._schedule_running(now, num_live, out, budget)
        if len(out.preempted_req_ids) == num_preempted and budget > 0 and self.waiting:
            plan = self._plan_waiting(now, num_live, self._free_units_for_waiting())
            self._schedule_waiting(plan, out, budget, chunked=True)
