"""Chunked prefill, like Sarathi-Serve: decodes never stall behind a long prompt.

Each step has one token budget. Running decodes go first (one token each), then running requests
that are part-way through their prompt, then new requests in arrival order; a prompt that does not fit
the remaining budget is split into chunks over several steps. Memory pressure preempts the newest
running request by recompute, as in FCFS.
"""
from __future__ import annotations

from aptserve.sched.base import Scheduler
from aptserve.sched.output import SchedulerOutput


# Tokens per step of the chunked policies when --max-num-batched-tokens is not given.
CHUNKED_MAX_NUM_BATCHED_TOKENS = 512


class ChunkedScheduler(Scheduler):
    name = "chunked"
    summary = "Sarathi-like chunked prefill: decodes first, prompts chunked into a token budget"
    default_max_num_batched_tokens = CHUNKED_MAX_NUM_BATCHED_TOKENS

    def _schedule(self, now: float, out: SchedulerOutput) -> None:
        num_preempted = len(out.preempted_request_ids)
        budget = self._schedule_running_chunks(out, self.config.max_num_batched_tokens, now)
        # Nothing new starts in a step that had to preempt for memory: the memory is not there.
        if len(out.preempted_request_ids) == num_preempted:
            self._schedule_waiting(out, budget, now)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, now: float) -> None:
        while budget > 0 and self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            prefix = self.prefix.cached_prefix(request, request.cache_kind)
            request.num_computed_tokens = len(prefix) * self.cache.block_size  # the chunk comes after the hit
            num_new = min(request.num_tokens - request.num_computed_tokens, budget, self._chunk_cap(out, request, now))
            reserve = self.watermark_units if self.running else 0
            if num_new <= 0 or not self._start(out, request, request.cache_kind, prefix, num_new, reserve):
                request.num_computed_tokens = 0
                break
            budget -= num_new
