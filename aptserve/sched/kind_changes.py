"""Cache-kind changes of admitted requests, a part of every policy (Scheduler in sched/base.py inherits it): asked for
by hand (LLMEngine.convert_request), chosen by the apt greedy (upgrades of hidden requests to KV) or forced by memory
(demotions of KV requests to hidden rows, in place of a preemption)."""
from __future__ import annotations

from aptserve.cache.tables import CacheKind
from aptserve.config import HybridMode
from aptserve.request import Request, RequestStatus
from aptserve.sched.output import CacheConversion, SchedulerOutput


class KindChanges:
    """Scheduler's conversions; it reads the scheduler's cache, requests, config and counters, and _preempt."""

    def request_conversion(self, request_id: str, kind: CacheKind) -> None:
        """Ask for a request's cache to change kind at the next step (HIDDEN -> KV in place by projection once
        memory allows; KV -> HIDDEN in place by solving K/V back where the engine demotes in place, else by
        recompute)."""
        if self.hybrid_cache == HybridMode.OFF and kind == CacheKind.HIDDEN:
            raise ValueError("the hybrid cache is off for this engine; HIDDEN is not available")
        if request_id in self.requests:
            self._requested_conversions[request_id] = kind

    def _apply_requested_conversions(self, out: SchedulerOutput) -> None:
        for request_id, kind in list(self._requested_conversions.items()):
            request = self.requests.get(request_id)
            if request is None or request.cache_kind == kind:
                del self._requested_conversions[request_id]
            elif request.status != RequestStatus.RUNNING:
                request.cache_kind = kind  # nothing cached yet: it is simply admitted as `kind`
                del self._requested_conversions[request_id]
            elif kind == CacheKind.HIDDEN:
                if not (self._can_demote(request) and self._convert_in_place(request, kind, out)):
                    self._preempt(request, out, next_kind=CacheKind.HIDDEN)
                del self._requested_conversions[request_id]
            elif self._convert_in_place(request, kind, out):
                del self._requested_conversions[request_id]

    def _can_demote(self, request: Request) -> bool:
        """Whether the request's K/V can become hidden rows in place: it holds K/V and the model keeps each layer's
        K/V left inverse (demote_in_place, resolved only where K/V determine the smaller hidden rows: MHA)."""
        return self.config.demote_in_place and request.cache_kind == CacheKind.KV and request.num_computed_tokens > 0

    def _convert_in_place(self, request: Request, kind: CacheKind, out: SchedulerOutput) -> bool:
        """HIDDEN -> KV by projecting the stored rows, KV -> HIDDEN by solving K/V back to them (_can_demote);
        False (nothing changed) if memory is short."""
        src_kind, num_tokens = request.cache_kind, request.num_computed_tokens
        unit_ids = (self.cache.demote(request.request_id, num_tokens) if kind == CacheKind.HIDDEN
                    else self.cache.convert(request.request_id, kind, num_tokens))
        if unit_ids is None:
            return False
        out.conversions.append(CacheConversion(request.request_id, num_tokens, src_kind, list(unit_ids[0]),
                                               kind, list(unit_ids[1])))
        request.cache_kind = kind
        request.num_conversions += 1
        self.num_conversions += 1
        return True

    def _demote(self, request: Request, out: SchedulerOutput, now: float) -> bool:
        """Under memory pressure, turn a running KV request's K/V into hidden rows in place (half its memory on
        multi-head attention) so it keeps decoding, where the policy allows it (`_keeps_running_hidden`); False
        (nothing changed) where it does not or the hidden rows do not fit."""
        demoted = (self._can_demote(request)
                   and self._keeps_running_hidden(request, now)
                   and self._convert_in_place(request, CacheKind.HIDDEN, out))
        self.num_demotions += demoted
        return demoted

    def _keeps_running_hidden(self, request: Request, now: float) -> bool:
        """Whether a running request the pool cannot hold may go on as hidden rows (the apt policies price it)."""
        return False
