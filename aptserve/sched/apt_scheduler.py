"""The Apt-Serve policies: value = pending time, memory priced per cache kind, the greedy of apt.py.

Value of a request: p = now - last_token_time (since arrival before its first token). Serving it
from the hidden cache costs every live request the K/V recompute time: hidden value =
p - U * alpha * m, with m its blocks, U the waiting + running requests not yet past their SLO, and
alpha the seconds to re-project one block's K/V across all layers. Hidden rows are offered at all only where the
step-time model predicts they keep every decoding request within its TBT SLO and do not lower the batch's decode
throughput (step_time.py). A request past its SLO is worth
almost nothing (KV only), so it goes last and is the first to be preempted.

One greedy (apt.solve) prices, against the free memory, both admissions of waiting requests (KV or
hidden) and upgrades of running hidden requests to KV (worth U * alpha * m: the recompute they stop
costing). Running requests keep decoding in the kind they hold (hidden ones from their hidden rows);
they are preempted only when the pool cannot hold their next tokens, lowest value per unit first; a KV one is first
demoted to hidden rows (K/V solved back to x, half the memory on MHA) where a hidden admission of it would be offered.
Preempting for nothing would throw away a cache that costs a whole prefill to rebuild, which is why
this departs from the paper's decode greedy (that one may evict a running request to admit nobody).
A long queue is not priced whole each step: apt_candidates.py hands the greedy those that rank first in its walk.

`apt` (the paper's iteration): each step is a prefill or a decode iteration, whichever side has waited
longer in total (decode if no prefill fits). `apt-chunked` (ours): every step does both,
Sarathi-style: decodes first, never stalled, then the admitted prompts chunked into the token budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from aptserve.cache.tables import CacheKind
from aptserve.config import EngineConfig, HybridMode
from aptserve.request import Request
from aptserve.sched.apt import KnapsackItem, solve, total_value
from aptserve.sched.apt_candidates import MIN_CANDIDATES, ShapePrice, waiting_candidates
from aptserve.sched.base import Scheduler
from aptserve.sched.chunked import CHUNKED_MAX_NUM_BATCHED_TOKENS
from aptserve.sched.output import SchedulerOutput
from aptserve.sched.step_cost import attention_work
from aptserve.sched.step_time import NO_HIDDEN_TIME_LIMIT, StepTime
from aptserve.sched.tbt_allowance import next_gap_allowance_s
from aptserve.sched.waiting import ShapeBucket

# Value of a request past its SLO, relative to its pending time: tiny, but ordered by waiting time.
VIOLATOR_WEIGHT = 1e-6


# Hashable (plan keys) but not frozen: one is built per waiting candidate every step (see apt.KnapsackItem).
@dataclass(slots=True, unsafe_hash=True)
class Admit:
    """Knapsack item id: admit a waiting request (as KV or hidden)."""

    request_id: str


@dataclass(slots=True, unsafe_hash=True)
class Upgrade:
    """Knapsack item id: convert a running hidden request to KV in place."""

    request_id: str


PlanEntry = tuple[Admit | Upgrade, CacheKind]


class AptScheduler(Scheduler):
    name = "apt"
    summary = "Apt-Serve's iteration: a prefill or a decode step, whichever has waited longer; the greedy by value"
    prices_hidden_cache = True

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.alpha_s = self.config.alpha_s
        self._min_block_units = min(self.cache.units_per_block(kind) for kind in CacheKind)

    def _schedule(self, now: float, out: SchedulerOutput) -> None:
        budget = self._free_units_for_plan()
        running_p = sum(now - r.last_token_s for r in self.running)
        plan = []  # admissions are priced only where the prefill side has waited longer (else the step decodes)
        if not self.running or running_p <= self._total_waiting_pending_s(now):
            plan = self._plan(now, None, upgrades=False, budget=budget)
        if self.running and not plan:
            self._apply_plan(self._plan(now, None, upgrades=True, waiting=False, budget=budget), out, 0, False, now)
            self._schedule_running_chunks(out, self.config.max_num_batched_tokens, now)
        else:
            self._apply_plan(plan, out, self.config.max_num_batched_tokens, False, now)

    # --- values ------------------------------------------------------------------------------
    def _num_live(self, now: float) -> int:
        """U: requests in the system not yet past their SLO."""
        return self.waiting.num_live(now) + len(self.running) - sum(r.is_past_slo(now) for r in self.running)

    def _total_waiting_pending_s(self, now: float) -> float:
        if len(self.waiting) <= MIN_CANDIDATES:
            return sum(now - r.last_token_s for r in self.waiting)
        return len(self.waiting) * now - self.waiting.sum_last_token_s  # the same sum, not added up each step

    def _value(self, request: Request, now: float) -> float:
        pending_s = now - request.last_token_s
        return (VIOLATOR_WEIGHT if request.is_past_slo(now) else 1.0) * pending_s

    def _waiting_item(self, request: Request, now: float, num_live: int, time: StepTime) -> KnapsackItem:
        value, item_id = self._value(request, now), Admit(request.request_id)
        if self.hybrid_cache == HybridMode.ALL_HIDDEN:  # one option, the hidden table, in the item's KV slot
            return KnapsackItem(item_id, self._admission_units(request, CacheKind.HIDDEN), value)
        kv_units = self._admission_units(request, CacheKind.KV)
        if self.hybrid_cache == HybridMode.OFF or request.is_past_slo(now):  # KV only: no hidden option
            return KnapsackItem(item_id, kv_units, value)
        hidden_units = self._admission_units(request, CacheKind.HIDDEN)
        num_blocks = self.cache.num_blocks(request.num_tokens)
        # As _shape_price prices its shape (the request's own TBT SLO is checked with the others chosen, below).
        if hidden_units >= kv_units or not time.offers_hidden(*self._hidden_row_s(num_blocks)):
            return KnapsackItem(item_id, kv_units, value)
        return KnapsackItem(item_id, kv_units, value, hidden_units, value - num_live * self.alpha_s * num_blocks)

    def _hidden_row_s(self, num_blocks: int) -> tuple[float, float]:
        """What a hidden request of `num_blocks` adds to every step it is in: its K/V re-projected, and its row."""
        return self.alpha_s * num_blocks, self._row_s(num_blocks)

    def _row_s(self, num_blocks: int) -> float:
        """A decode row's time in a step: its token and the context of `num_blocks` it reads."""
        return self.step_cost.per_token_s + self.step_cost.per_attention_s * num_blocks * self.cache.block_size

    def _step_time(self, now: float) -> StepTime:
        """The time the next steps have for newly hidden rows (batch-aware pricing, below)."""
        running = self.running
        work = sum(attention_work(r.num_computed_tokens, 1) for r in running)
        recompute = sum(r.num_computed_tokens for r in running if r.cache_kind == CacheKind.HIDDEN)
        decode_s = self.step_cost.predict(len(running), work, recompute)
        decoding = [r for r in running if r.output_token_ids]
        allowance_s = next_gap_allowance_s(decoding, now) if decoding else math.inf
        return StepTime(self.config.step_tbt_fraction or 1.0, decode_s, allowance_s, len(running))

    def _admission_units(self, request: Request, kind: CacheKind) -> int:
        """Units admitting the request as `kind` takes from the free memory: blocks of its prefix that are cached
        and read by others already cost nothing."""
        return self.cache.num_new_units(request.request_id, kind, request.num_tokens,
                                        self.prefix.cached_prefix(request, kind))

    def _shape_price(self, bucket: ShapeBucket, num_live: int, time: StepTime) -> ShapePrice:
        """(KV units, hidden units or None, hidden cost) of a waiting request of this shape with no prefix cached,
        as _waiting_item prices it (ALL_HIDDEN: the hidden table is the one option, in the KV slot)."""
        num_blocks = bucket.num_blocks
        hidden_units = num_blocks * self.cache.units_per_block(CacheKind.HIDDEN)
        if self.hybrid_cache == HybridMode.ALL_HIDDEN:
            return hidden_units, None, 0.0
        kv_units = num_blocks * self.cache.units_per_block(CacheKind.KV)
        if (self.hybrid_cache == HybridMode.OFF or hidden_units >= kv_units
                or not time.offers_hidden(*self._hidden_row_s(num_blocks))):
            return kv_units, None, 0.0
        return kv_units, hidden_units, num_live * self.alpha_s * num_blocks

    def _upgrade_item(self, request: Request, num_live: int) -> KnapsackItem:
        extra = (self.cache.num_units_for(CacheKind.KV, request.num_tokens)
                 - self.cache.num_units_for(CacheKind.HIDDEN, request.num_tokens))
        saved = num_live * self.alpha_s * self.cache.num_blocks(request.num_tokens)
        return KnapsackItem(Upgrade(request.request_id), extra, saved)

    # --- the plan ----------------------------------------------------------------------------
    def _plan(self, now: float, num_live: int | None, upgrades: bool, waiting: bool = True,
              budget: int | None = None) -> list[PlanEntry]:
        """(item id, choice) the greedy picks against the free memory (`budget`: _free_units_for_plan's, if the
        caller has it), best value per unit first. `num_live`: U, counted here if None and anything is priced."""
        # A full batch admits nobody (else a prefill iteration that admits nobody could repeat forever).
        num_free_seqs = self.config.max_num_seqs - len(self.running)
        budget = self._free_units_for_plan() if budget is None else budget
        items = []
        # Every admission takes at least a block's units (its last token is never cached): below that none fits,
        # and the walk stops by the (budget // those + 1)-th admission, so no candidate ranked later can matter.
        admits = waiting and num_free_seqs > 0 and budget >= self._min_block_units
        # An upgrade takes units too: none fits a budget of 0.
        hidden = ([r for r in self.running if r.cache_kind == CacheKind.HIDDEN]
                  if upgrades and budget > 0 and self.hybrid_cache == HybridMode.ON else [])
        if num_live is None and (admits or hidden):
            num_live = self._num_live(now)
        time = self._step_time(now) if admits and self.hybrid_cache == HybridMode.ON else NO_HIDDEN_TIME_LIMIT
        if admits:
            limit = min(max(MIN_CANDIDATES, num_free_seqs), budget // self._min_block_units + 1)
            candidates = waiting_candidates(self.waiting, now, limit, budget, VIOLATOR_WEIGHT,
                                            lambda bucket: self._shape_price(bucket, num_live, time))
            items = [self._waiting_item(r, now, num_live, time) for r in candidates]
        items += [self._upgrade_item(r, num_live) for r in hidden]
        choices = self._solve(items, budget, time)
        by_id = {item.id: item for item in items}
        plan = [(item_id, choice) for item_id, choice in choices.items() if choice is not None]
        plan.sort(key=lambda entry: -by_id[entry[0]].kv_value / by_id[entry[0]].kv_units)
        return plan

    def _solve(self, items: list[KnapsackItem], budget: int, time: StepTime) -> dict:
        """The greedy's choices within `budget` and the step time. The pool lends the recompute scratch its units
        with the first hidden table (cache/manager.py), so while none is held a plan with hidden rows has the
        budget less the scratch: the greedy then runs KV only over the whole budget and with the hidden options
        over the rest, and the plan of more value is kept. Each is within 2x of the best plan of its own kind,
        so the one kept is within 2x of the best plan of either."""
        scratch = self.cache.num_scratch_units_to_take
        if self.hybrid_cache == HybridMode.ALL_HIDDEN:  # every admission is a hidden table
            return solve(items, max(0, budget - scratch))
        if scratch == 0 or all(item.hidden_units is None for item in items):
            return self._within_step_time(items, solve(items, budget), budget, time)
        kv_items = [KnapsackItem(item.id, item.kv_units, item.kv_value) for item in items]
        kv_choices = solve(kv_items, budget)
        if budget <= scratch:
            return kv_choices
        hybrid = self._within_step_time(items, solve(items, budget - scratch), budget - scratch, time)
        if (CacheKind.HIDDEN in hybrid.values()
                and total_value(items, hybrid) > total_value(kv_items, kv_choices)):
            return hybrid
        return kv_choices

    def _within_step_time(self, items: list[KnapsackItem], choices: dict, budget: int, time: StepTime) -> dict:
        """The greedy's choices with no more hidden rows than the step time allows all together: the chosen
        hidden admissions are kept in the greedy's order while their re-projection fits every limit (the batch's
        shared one and each kept request's own) and their rows together cost no more than a request's share of
        the step they join each; if any is left out, the greedy runs again with the hidden option only for those
        kept, so whatever it chooses fits."""
        if time is NO_HIDDEN_TIME_LIMIT:
            return choices
        chosen = sorted((item for item in items if choices[item.id] == CacheKind.HIDDEN),
                        key=lambda item: -item.hidden_value / item.hidden_units)
        kv_rows_s = [self._row_s(self.cache.num_blocks(self.requests[i.request_id].num_tokens))
                     for i, choice in choices.items() if choice == CacheKind.KV and isinstance(i, Admit)]
        share_s = time.share_s(sum(kv_rows_s), len(kv_rows_s))
        used_s, rows_s, limit_s, kept = 0.0, 0.0, time.shared_s, set()
        for item in chosen:
            request = self.requests[item.id.request_id]
            recompute_s, row_s = self._hidden_row_s(self.cache.num_blocks(request.num_tokens))
            own_limit_s = min(limit_s, time.limit_s(request))
            if used_s + recompute_s <= own_limit_s and rows_s + recompute_s + row_s <= (len(kept) + 1) * share_s:
                used_s, rows_s, limit_s = used_s + recompute_s, rows_s + recompute_s + row_s, own_limit_s
                kept.add(item.id)
        if len(kept) == len(chosen):
            return choices
        for item in items:
            if item.hidden_units is not None and item.id not in kept:
                item.hidden_units = item.hidden_value = None
        return solve(items, budget)

    def _free_units_for_plan(self) -> int:
        """Free units less the rows running requests need next step and the admission watermark."""
        num_new_units, growth = self.cache.num_new_units, 0
        for request in self.running:  # a loop, not a generator: this runs every step over the whole batch
            growth += num_new_units(request.request_id, request.cache_kind, request.num_tokens)
        reserve = self.watermark_units if self.running else 0
        return max(0, self.cache.num_free_units - growth - reserve)

    def _apply_plan(self, plan: list[PlanEntry], out: SchedulerOutput, budget: int, chunked: bool,
                    now: float) -> int:
        """Convert the chosen upgrades in place and admit the chosen waiting requests; returns budget left."""
        for item_id, choice in plan:
            request = self.requests[item_id.request_id]
            if isinstance(item_id, Upgrade):
                self._convert_in_place(request, CacheKind.KV, out)  # stays HIDDEN if memory is short
            elif budget > 0 and len(self.running) < self.config.max_num_seqs:
                budget = self._admit_planned(request, self._kind(choice), out, budget, chunked, now)
        return budget

    def _admit_planned(self, request: Request, kind: CacheKind, out: SchedulerOutput, budget: int,
                       chunked: bool, now: float) -> int:
        prefix = self.prefix.cached_prefix(request, kind)
        request.num_computed_tokens = len(prefix) * self.cache.block_size  # the chunk comes after the hit
        num_new = request.num_tokens - request.num_computed_tokens
        if chunked:
            num_new = min(num_new, budget, self._chunk_cap(out, request, now))
        # Not admitted: with no token this step (the step's time is spent), a whole prompt that does not fit the
        # budget when not chunked (a smaller one further down may still fit), or memory that is short.
        if (num_new <= 0 or (not chunked and out.scheduled and num_new > budget)
                or not self._start(out, request, kind, prefix, num_new)):
            request.num_computed_tokens = 0
            return budget
        return max(0, budget - num_new)

    def _kind(self, choice: CacheKind) -> CacheKind:
        return CacheKind.HIDDEN if self.hybrid_cache == HybridMode.ALL_HIDDEN else choice

    def _keeps_running_hidden(self, request: Request, now: float) -> bool:
        """A running KV request the pool cannot hold goes on as hidden rows (kind_changes._demote) where a hidden
        admission of its context would be offered: within its SLO, its re-projection within the batch's step time
        (StepTime.offers_hidden). Else it is freed to prefill again. A demotion costs a solve, a re-projection each
        step it stays hidden and a projection when upgraded back; a recompute, a prefill and its place in the batch."""
        return not request.is_past_slo(now) and self._step_time(now).offers_hidden(
            *self._hidden_row_s(self.cache.num_blocks(request.num_tokens)))

    def _pick_victim(self, candidates: list[Request], now: float) -> Request:
        """Under memory pressure, preempt the running request worth least per unit of memory."""
        return min(candidates, key=lambda r: self._value(r, now) / max(1, self.cache.num_units_held(r.request_id)))


class AptChunkedScheduler(AptScheduler):
    name = "apt-chunked"
    summary = "the default: Apt-Serve's greedy over chunked steps (decodes never stall), steps sized to TBT SLOs"
    default_max_num_batched_tokens = CHUNKED_MAX_NUM_BATCHED_TOKENS
    default_step_tbt_fraction = 0.8

    def _schedule(self, now: float, out: SchedulerOutput) -> None:
        plan = self._plan(now, None, upgrades=True)
        upgrades = [entry for entry in plan if isinstance(entry[0], Upgrade)]
        self._apply_plan(upgrades, out, 0, True, now)
        num_preempted = len(out.preempted_request_ids)
        budget = self._schedule_running_chunks(out, self.config.max_num_batched_tokens, now)
        if len(out.preempted_request_ids) == num_preempted:  # no memory to spare after a preemption
            admissions = [entry for entry in plan if isinstance(entry[0], Admit)]
            self._apply_plan(admissions, out, budget, True, now)
