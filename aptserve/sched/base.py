"""Scheduler base: queues, admission checks and the bookkeeping every policy shares.

A policy implements `_schedule(now, out)`; everything else (adding, aborting, applying a runner's
output, stop checks, freeing cache units) lives here, so policies differ only in whom they run.
"""
from __future__ import annotations

from collections import deque

from aptserve.cache.manager import CacheKind, CacheManager
from aptserve.config import SchedulerConfig
from aptserve.errors import InvalidRequestError
from aptserve.request import Request, RequestStatus
from aptserve.sched.output import CacheConversion, RunnerOutput, ScheduledRequest, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheManager, watermark: float = 0.01,
                 hybrid_cache: str = "off") -> None:
        """`hybrid_cache`: "off" (KV only), "on" (policies may choose HIDDEN) or "all-hidden" (every
        request is admitted as HIDDEN: a test and measurement setting)."""
        self.config = config
        self.cache = cache
        self.hybrid_cache = hybrid_cache
        self._requested_conversions: dict[str, CacheKind] = {}
        self.num_conversions = 0
        self.watermark_units = int(watermark * cache.num_units)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_req_ids: list[str] = []
        self._step_id = 0
        self.num_preemptions = 0

    # --- requests in and out -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.req_id in self.requests:
            raise InvalidRequestError(f"request id {request.req_id!r} is already in use")
        self.check_fits(request)
        if self.hybrid_cache == "all-hidden":
            request.cache_kind = CacheKind.HIDDEN
        request.status = RequestStatus.WAITING
        self.requests[request.req_id] = request
        self.waiting.append(request)

    def check_fits(self, request: Request) -> None:
        """Reject up front what could never complete, so no request can livelock the pool."""
        max_len = self.config.max_model_len
        if request.num_prompt_tokens == 0:
            raise InvalidRequestError("the prompt is empty; send at least one token")
        if request.num_prompt_tokens >= max_len:
            raise InvalidRequestError(
                f"the prompt has {request.num_prompt_tokens} tokens but the maximum context length is "
                f"{max_len}; shorten the prompt")
        if request.max_num_tokens > max_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {max_len} tokens, but {request.max_num_tokens} "
                f"were requested ({request.num_prompt_tokens} in the prompt, "
                f"{request.sampling_params.max_tokens} in max_tokens); lower max_tokens or the prompt")
        kinds = [CacheKind.KV] if self.hybrid_cache == "off" else list(CacheKind)
        need = min(self.cache.num_units_for(kind, request.max_num_tokens) for kind in kinds)
        if need > self.cache.num_units:
            raise InvalidRequestError(
                f"the request needs up to {need} cache units ({request.max_num_tokens} tokens) but the "
                f"pool has {self.cache.num_units}; raise kv_cache_memory or lower max_tokens")

    def abort_request(self, req_id: str) -> None:
        """Finish a request early (client gone); its units return to the pool. Unknown ids are ignored."""
        request = self.requests.get(req_id)
        if request is not None and not request.is_finished:
            self.finish_request(request, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.cache.free(request.req_id)
        self.requests.pop(request.req_id, None)
        self._finished_req_ids.append(request.req_id)

    # --- one step ----------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput(step_id=self._step_id, finished_req_ids=self._finished_req_ids)
        self._finished_req_ids = []
        self._step_id += 1
        self._apply_requested_conversions(out)
        self._schedule(now, out)
        for scheduled in out.scheduled:
            request = self.requests[scheduled.req_id]
            if request.first_scheduled_s is None:
                request.first_scheduled_s = now
        return out

    def _schedule(self, now: float, out: SchedulerOutput) -> None:
        raise NotImplementedError

    def update_from_output(self, out: SchedulerOutput, runner_out: RunnerOutput, now: float) -> list[Request]:
        """Advance the scheduled requests; returns those that finished in this step."""
        finished: list[Request] = []
        for scheduled in out.scheduled:
            request = self.requests.get(scheduled.req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted or preempted while the step ran
            request.num_computed_tokens += scheduled.num_tokens
            if not scheduled.sample:
                continue
            request.append_output_token(runner_out.sampled_token_ids[scheduled.req_id], now)
            status = self._check_stop(request)
            if status is not None:
                self.finish_request(request, status)
                finished.append(request)
        return finished

    def _check_stop(self, request: Request) -> RequestStatus | None:
        token_id = request.output_token_ids[-1]
        params = request.sampling_params
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if not params.ignore_eos and token_id in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # --- conversions --------------------------------------------------------------------------
    def request_conversion(self, req_id: str, kind: CacheKind) -> None:
        """Ask for a request's cache to change kind at the next step (HIDDEN -> KV in place by
        projection once memory allows; KV -> HIDDEN by recompute)."""
        if self.hybrid_cache == "off" and kind == CacheKind.HIDDEN:
            raise ValueError("the hybrid cache is off for this engine; HIDDEN is not available")
        if req_id in self.requests:
            self._requested_conversions[req_id] = kind

    def _apply_requested_conversions(self, out: SchedulerOutput) -> None:
        for req_id, kind in list(self._requested_conversions.items()):
            request = self.requests.get(req_id)
            if request is None or request.cache_kind == kind:
                del self._requested_conversions[req_id]
            elif request.status != RequestStatus.RUNNING:
                request.cache_kind = kind  # nothing cached yet: it is simply admitted as `kind`
                del self._requested_conversions[req_id]
            elif kind == CacheKind.HIDDEN:
                self._preempt(request, out, next_kind=CacheKind.HIDDEN)
                del self._requested_conversions[req_id]
            elif self._convert_in_place(request, kind, out):
                del self._requested_conversions[req_id]

    def _convert_in_place(self, request: Request, kind: CacheKind, out: SchedulerOutput) -> bool:
        """HIDDEN -> KV by projecting the stored rows; False (nothing changed) if memory is short."""
        src_kind, num_tokens = request.cache_kind, request.num_computed_tokens
        unit_ids = self.cache.convert(request.req_id, kind, num_tokens)
        if unit_ids is None:
            return False
        out.conversions.append(CacheConversion(request.req_id, num_tokens, src_kind, list(unit_ids[0]),
                                               kind, list(unit_ids[1])))
        request.cache_kind = kind
        request.num_conversions += 1
        self.num_conversions += 1
        return True

    # --- helpers for policies ----------------------------------------------------------------
    def _schedule_tokens(self, out: SchedulerOutput, request: Request, num_tokens: int) -> None:
        """Add `num_tokens` of the request's uncomputed tokens to the batch (units already allocated)."""
        start = request.num_computed_tokens
        token_ids = request.all_token_ids[start:start + num_tokens]
        out.scheduled.append(ScheduledRequest(
            req_id=request.req_id, token_ids=token_ids, start_pos=start, cache_kind=request.cache_kind,
            unit_ids=self.cache.unit_ids(request.req_id), sample=start + num_tokens == request.num_tokens,
            sampling_params=request.sampling_params))

    def _preempt(self, request: Request, out: SchedulerOutput, next_kind: CacheKind | None = None) -> None:
        """Preempt by recompute: free every unit; the request re-prefills prompt + outputs later,
        into a `next_kind` table if given (that is how KV -> HIDDEN conversion happens)."""
        self.running.remove(request)
        self.cache.free(request.req_id)
        if next_kind is not None:
            request.cache_kind = next_kind
            request.num_conversions += 1
            self.num_conversions += 1
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted_req_ids.append(request.req_id)

    def _allocate_or_preempt(self, request: Request, num_tokens: int, protected: list[Request],
                             out: SchedulerOutput) -> bool:
        """Give the request cache rows for `num_tokens` tokens, preempting the newest running requests
        (never one in `protected`, already scheduled this step) until it fits; False if it had to go."""
        while not self.cache.allocate(request.req_id, request.cache_kind, num_tokens):
            victims = [r for r in self.running if r is not request and r not in protected]
            self._preempt(self._pick_victim(victims) if victims else request, out)
            if not victims:
                return False
        return True

    def _pick_victim(self, candidates: list[Request]) -> Request:
        """The running request to preempt under memory pressure: the newest (vLLM's rule)."""
        return candidates[-1]

    def _schedule_running_chunks(self, out: SchedulerOutput, budget: int) -> int:
        """Running requests into the token budget: decodes first (one token each), then the rest of
        part-way prompts in chunks; returns the budget left. Memory pressure preempts the newest."""
        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        scheduled: list[tuple[Request, int]] = []
        for request in decodes + prefills:
            if budget == 0 or request not in self.running:
                continue  # out of budget, or preempted to make room for an earlier request
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if self._allocate_or_preempt(request, request.num_computed_tokens + num_new,
                                         [r for r, _ in scheduled], out):
                scheduled.append((request, num_new))
                budget -= num_new
        for request, num_new in scheduled:
            self._schedule_tokens(out, request, num_new)
        return budget

    def _admit(self, request: Request) -> None:
        """Waiting -> running; the caller has allocated its `request.cache_kind` table."""
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    # --- views -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def check_invariants(self) -> None:
        self.cache.check_invariants()
        assert len(self.waiting) + len(self.running) == len(self.requests), "a request was lost"
        for request in self.running:
            assert request.status == RequestStatus.RUNNING
            assert self.cache.has_table(request.req_id) or request.num_computed_tokens == 0
        for request in self.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert not self.cache.has_table(request.req_id), f"waiting {request.req_id} holds units"
