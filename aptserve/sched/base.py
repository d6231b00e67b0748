"""Scheduler base: queues, admission checks and the bookkeeping every policy shares.

A policy implements `_schedule(now, out)`; everything else (adding, aborting, applying a runner's output and
finishing what it stops, freeing cache units) lives here, so policies differ only in whom they run.
"""
from __future__ import annotations

from typing import ClassVar

from aptserve.cache.manager import CacheManager
from aptserve.cache.tables import CachedBlock, CacheKind
from aptserve.config import EngineConfig, HybridMode
from aptserve.errors import InvalidRequestError
from aptserve.request import Request, RequestStatus
from aptserve.sched.output import RunnerOutput, ScheduledRequest, SchedulerOutput
from aptserve.sched.chunk_size import chunk_cap
from aptserve.sched.kind_changes import KindChanges
from aptserve.sched.prefix_lookup import PrefixLookup
from aptserve.sched.step_cost import StepCostModel
from aptserve.sched.stop import check_stop
from aptserve.sched.waiting import WaitingQueue

# Every policy class that names itself, by name (filled as the sched package imports its modules).
POLICIES: dict[str, type[Scheduler]] = {}


class Scheduler(KindChanges):
    # A policy's traits: what the flags, the router and the snapshot need to know of it, declared with the policy.
    name: ClassVar[str] = ""  # the --scheduler value; a subclass that sets it is registered in POLICIES
    summary: ClassVar[str] = ""  # one line for --help
    # Tokens per step when --max-num-batched-tokens is not given; None: room for the longest whole prompt.
    default_max_num_batched_tokens: ClassVar[int | None] = None
    # Share of the tightest TBT SLO a step may take while requests decode (0: only the token budget bounds it).
    default_step_tbt_fraction: ClassVar[float] = 0.0
    # Chooses hidden rows for requests and prices them with alpha (which the engine then measures at start-up).
    prices_hidden_cache: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            POLICIES[cls.name] = cls

    def __init__(self, config: EngineConfig) -> None:
        """The policy over a pool sized by `config.cache`; `config.cache.hybrid` says whether policies may
        choose HIDDEN (ON), must (ALL_HIDDEN: a test and measurement setting) or never do (OFF)."""
        self.config = config.scheduler
        self.max_model_len = config.model.max_model_len
        self.hybrid_cache = config.cache.hybrid
        self.cache = CacheManager.from_config(config.cache)
        self.prefix = PrefixLookup(self.cache, f"{config.model.path}|{config.dtype}|{config.cache.dtype}")
        self.num_prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache at first admissions
        self.num_prefix_hit_tokens = 0  # ... and those found there
        self._requested_conversions: dict[str, CacheKind] = {}
        self.num_conversions = 0
        self.num_demotions = 0  # of those, KV -> hidden rows in place where memory ran out (_demote)
        # Requests admitted to the batch (first admissions and re-admissions after a preemption), by cache kind.
        self.num_admissions = {kind.value: 0 for kind in CacheKind}
        self.watermark_units = int(config.cache.watermark * self.cache.num_units)
        # Predicted step time from a step's make-up; the engine core refits it from the steps it runs (all but
        # the recompute price, alpha per block of hidden context).
        self.step_cost = StepCostModel(per_recompute_token_s=config.scheduler.alpha_s / config.cache.block_size)
        self.waiting = WaitingQueue(config.cache.block_size)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_request_ids: list[str] = []
        self._step_id = 0
        self.num_preemptions = 0

    # --- requests in and out -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        if self.hybrid_cache == HybridMode.ALL_HIDDEN:
            request.cache_kind = CacheKind.HIDDEN
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> None:
        """Finish a request early (client gone); its units return to the pool. Unknown ids are ignored."""
        request = self.requests.get(request_id)
        if request is not None and not request.is_finished:
            self.finish_request(request, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.cache.free(request.request_id)
        self.requests.pop(request.request_id, None)
        self._finished_request_ids.append(request.request_id)

    # --- one step ----------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput(step_id=self._step_id, finished_request_ids=self._finished_request_ids)
        self._finished_request_ids = []
        self._step_id += 1
        self._apply_requested_conversions(out)
        self._schedule(now, out)
        out.scratch_unit_ids = self.cache.scratch_unit_ids
        for scheduled in out.scheduled:
            request = self.requests[scheduled.request_id]
            if request.first_scheduled_s is None:
                request.first_scheduled_s = now
        return out

    def _schedule(self, now: float, out: SchedulerOutput) -> None:
        raise NotImplementedError

    def update_from_output(self, out: SchedulerOutput, runner_out: RunnerOutput, now: float) -> list[Request]:
        """Advance the scheduled requests, append their new tokens and finish those a token stops (stop_token_ids,
        EOS, max_tokens, max_model_len). Returns the requests that got a token, the finished among them (their
        status says so). Stop strings need text: the front end decides them and aborts the request here."""
        for request_id, (position, scored) in runner_out.prompt_logprobs.items():
            if (request := self.requests.get(request_id)) is not None:
                request.keep_prompt_logprobs(position, scored)
        sampled: list[Request] = []
        for scheduled in out.scheduled:
            request = self.requests.get(scheduled.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted or preempted while the step ran
            request.num_computed_tokens += scheduled.num_tokens
            block_size = self.cache.block_size
            if (self.cache.enable_prefix_caching  # a block filled up: it may be shared from now on
                    and request.num_computed_tokens // block_size > scheduled.start_pos // block_size):
                self.cache.register(request.request_id, self.prefix.block_keys(request), request.num_computed_tokens)
            if scheduled.sample:
                request.append_output_token(runner_out.sampled_token_ids[scheduled.request_id], now)
                if (stop := check_stop(request, self.max_model_len)) is not None:
                    request.stop_token_id = stop[1]
                    self.finish_request(request, stop[0])
                sampled.append(request)
        return sampled

    # --- admission ---------------------------------------------------------------------------
    def _start(self, out: SchedulerOutput, request: Request, kind: CacheKind, prefix: list[CachedBlock],
               num_new: int, reserve: int = 0) -> bool:
        """Admit a waiting request as `kind`: its table starts with the cached `prefix` (those tokens count as
        computed) and covers `num_new` more tokens, scheduled now; False (nothing changed) if memory is short."""
        num_cached = len(prefix) * self.cache.block_size
        if not self.cache.can_allocate(request.request_id, kind, num_cached + num_new, reserve, prefix):
            return False
        self.cache.allocate(request.request_id, kind, num_cached + num_new, prefix)
        if request.first_scheduled_s is None and request.num_preemptions == 0:  # its first admission
            request.num_cached_tokens = num_cached
            self.num_prefix_query_tokens += request.num_tokens
            self.num_prefix_hit_tokens += num_cached
        request.cache_kind = kind
        request.num_computed_tokens = num_cached
        self.num_admissions[kind.value] += 1
        self._admit(request)
        self._schedule_tokens(out, request, num_new)
        return True

    # --- helpers for policies ----------------------------------------------------------------
    def _schedule_tokens(self, out: SchedulerOutput, request: Request, num_tokens: int) -> None:
        """Add `num_tokens` of the request's uncomputed tokens to the batch (units already allocated)."""
        start = request.num_computed_tokens
        token_ids = request.token_ids_slice(start, start + num_tokens)
        params, sample = request.sampling_params, start + num_tokens == request.num_tokens
        reads_outputs = sample and (params.has_penalties or params.min_tokens > 0)
        reads_prompt = ((sample and params.repetition_penalty != 1)
                        or (params.prompt_logprobs is not None and start < request.num_prompt_tokens))
        out.scheduled.append(ScheduledRequest(
            request_id=request.request_id, token_ids=token_ids, start_pos=start, cache_kind=request.cache_kind,
            unit_ids=self.cache.unit_ids(request.request_id), sample=sample, sampling_params=params,
            prompt_token_ids=request.prompt_token_ids if reads_prompt else None,
            output_token_ids=request.output_token_ids if reads_outputs else None))

    def _preempt(self, request: Request, out: SchedulerOutput, next_kind: CacheKind | None = None) -> None:
        """Preempt by recompute: free every unit; the request re-prefills prompt + outputs later, into a `next_kind`
        table if given (a requested KV -> HIDDEN conversion where K/V cannot be demoted in place)."""
        self.running.remove(request)
        self.cache.free(request.request_id)
        if next_kind is not None:
            request.cache_kind = next_kind
            request.num_conversions += 1
            self.num_conversions += 1
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted_request_ids.append(request.request_id)

    def _allocate_or_preempt(self, request: Request, num_tokens: int, protected: list[Request],
                             out: SchedulerOutput, now: float) -> bool:
        """Give the request cache rows for `num_tokens` tokens, preempting running requests (never one
        in `protected`, already scheduled this step) until it fits; False if it had to go itself."""
        while not self.cache.allocate(request.request_id, request.cache_kind, num_tokens):
            victims = [r for r in self.running if r is not request and r not in protected]
            victim = self._pick_victim(victims, now) if victims else request
            if self._demote(victim, out, now):
                continue  # it keeps running, in half the memory
            self._preempt(victim, out)
            if not victims:
                return False
        return True

    def _pick_victim(self, candidates: list[Request], now: float) -> Request:
        """The running request to preempt under memory pressure: the newest (vLLM's rule)."""
        return candidates[-1]

    def _schedule_running_chunks(self, out: SchedulerOutput, budget: int, now: float) -> int:
        """Running requests into the token budget: decodes first (one token each), then the rest of
        part-way prompts in chunks; returns the budget left. Memory pressure preempts the newest."""
        num_left = [(r, r.num_tokens - r.num_computed_tokens) for r in self.running]
        scheduled: list[Request] = []
        for request, num_uncomputed in [e for e in num_left if e[1] == 1] + [e for e in num_left if e[1] > 1]:
            if budget == 0 or request.status != RequestStatus.RUNNING:
                continue  # out of budget, or preempted to make room for an earlier request
            num_new = min(num_uncomputed, budget)
            if num_new > 1:
                num_new = min(num_new, self._chunk_cap(out, request, now))
            if num_new and self._allocate_or_preempt(request, request.num_computed_tokens + num_new, scheduled,
                                                     out, now):
                scheduled.append(request)
                self._schedule_tokens(out, request, num_new)
                budget -= num_new
        return budget

    def _chunk_cap(self, out: SchedulerOutput, request: Request, now: float) -> int:
        """Most prompt tokens `request` may add to this step besides the token budget (chunk_size.py)."""
        return chunk_cap(out, request, self.running, self.step_cost, self.config.step_tbt_fraction, now)

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
            assert self.cache.has_table(request.request_id) or request.num_computed_tokens == 0
        for request in self.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert not self.cache.has_table(request.request_id), f"waiting {request.request_id} holds units"
