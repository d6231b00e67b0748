"""Chunked prefill, like Sarathi-Serve: decodes never stall behind a long prompt.

Each step has one token budget. Running decodes go first (one token each), then running requests
that are part-way through their prompt, then new requests in arrival order; a prompt that does not fit
the remaining budget is split into chunks over several steps. Memory pressure preempts the newest
running request by recompute, as in FCFS.
"""
from __future__ import annotations

from aptserve.request import Request
from aptserve.sched.base import Scheduler
from aptserve.sched.output import SchedulerOutput


class ChunkedScheduler(Scheduler):
    def _schedule(self, now: float, out: SchedulerOutput) -> None:
        num_preempted = len(out.preempted_req_ids)
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        # Nothing new starts in a step that had to preempt for memory: the memory is not there.
        if len(out.preempted_req_ids) == num_preempted:
            self._schedule_waiting(out, budget)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        scheduled: list[tuple[Request, int]] = []
        for request in decodes + prefills:
            if budget == 0:
                break
            if request not in self.running:
                continue  # preempted to make room for an earlier request
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if self._allocate_or_preempt(request, request.num_computed_tokens + num_new,
                                         [r for r, _ in scheduled], out):
                scheduled.append((request, num_new))
                budget -= num_new
        for request, num_new in scheduled:
            self._schedule_tokens(out, request, num_new)
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while budget > 0 and self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new = min(request.num_tokens, budget)
            reserve = self.watermark_units if self.running else 0
            if not self.cache.can_allocate(request.req_id, request.cache_kind, num_new, reserve):
                break
            self.cache.allocate(request.req_id, request.cache_kind, num_new)
            self._admit(request)
            self._schedule_tokens(out, request, num_new)
            budget -= num_new
