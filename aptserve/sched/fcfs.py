"""FCFS, like vLLM's default scheduler without chunked prefill.

Prefill first: admit waiting requests in arrival order while the token, sequence and memory budgets
allow, as a prefill-only batch. Otherwise decode every running request, oldest first; when a decode
cannot get a slot, preempt the newest running request by recompute (it goes back to the front of the
queue) until the slot fits.
"""
from __future__ import annotations

from aptserve.request import Request, RequestStatus
from aptserve.sched.base import Scheduler
from aptserve.sched.output import SchedulerOutput


class FcfsScheduler(Scheduler):
    name = "fcfs"
    summary = "vLLM-like: whole prompts first, in arrival order, then decodes"

    def _schedule(self, now: float, out: SchedulerOutput) -> None:
        if not self._schedule_prefills(out):
            self._schedule_decodes(out, now)

    def _schedule_prefills(self, out: SchedulerOutput) -> bool:
        num_batched_tokens = 0
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            prefix = self.prefix.cached_prefix(request, request.cache_kind)
            num_new_tokens = request.num_tokens - len(prefix) * self.cache.block_size
            # A prompt longer than the token budget still runs, alone, so it cannot starve.
            if out.scheduled and num_batched_tokens + num_new_tokens > self.config.max_num_batched_tokens:
                break
            reserve = self.watermark_units if self.running else 0
            if not self._start(out, request, request.cache_kind, prefix, num_new_tokens, reserve):
                break
            num_batched_tokens += num_new_tokens
        return bool(out.scheduled)

    def _schedule_decodes(self, out: SchedulerOutput, now: float) -> None:
        decodes: list[Request] = []
        for request in list(self.running):
            if request.status != RequestStatus.RUNNING:
                continue  # preempted to make room for an older request
            # One more slot: rows for every token up to and including the one fed this step.
            if self._allocate_or_preempt(request, request.num_tokens, decodes, out, now):
                decodes.append(request)
        for request in decodes:
            self._schedule_tokens(out, request, request.num_tokens - request.num_computed_tokens)
