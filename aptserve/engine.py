"""LLMEngine: step() = schedule -> execute -> update requests, detokenize, report outputs.

The engine depends on two small protocols so the simulator can drive the very same step():
an Executor (the torch ModelRunner, or a cost model) and a Clock (wall or simulated).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Protocol

from aptserve.cache.manager import CacheKind, CacheManager
from aptserve.config import EngineConfig, ModelConfig
from aptserve.detokenizer import IncrementalDetokenizer
from aptserve.errors import InvalidRequestError
from aptserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from aptserve.request import Request, RequestStatus
from aptserve.sampling import SamplingParams
from aptserve.sched import create_scheduler
from aptserve.sched.output import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


class Executor(Protocol):
    def execute(self, sched_out: SchedulerOutput) -> RunnerOutput: ...


class Clock(Protocol):
    def now(self) -> float: ...


class WallClock:
    def now(self) -> float:
        return time.perf_counter()


class LLMEngine:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, cache: CacheManager,
                 executor: Executor, tokenizer=None, clock: Clock | None = None,
                 hybrid_cache: str = "off") -> None:
        self.config = config
        self.model_config = model_config
        self.cache = cache
        self.executor = executor
        self.tokenizer = tokenizer
        self.clock = clock or WallClock()
        self.hybrid_cache = hybrid_cache
        self.scheduler = create_scheduler(config.scheduler.policy, config.scheduler, cache,
                                          config.cache.watermark, hybrid_cache)
        self._requests: dict[str, Request] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._req_counter = itertools.count()
        self.num_steps = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        """Resolve the model, size the pool from the byte budget, load weights."""
        from aptserve.builder import build_engine_parts

        model_config, scheduler_config, hybrid_cache, cache, runner, tokenizer = build_engine_parts(config)
        config = dataclasses.replace(config, scheduler=scheduler_config)
        return cls(config, model_config, cache, runner, tokenizer, hybrid_cache=hybrid_cache)

    # --- requests ----------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_s: float | None = None,
                    ttft_slo_s: float | None = None, tbt_slo_s: float | None = None) -> Request:
        """Queue a request; raises InvalidRequestError (nothing queued) when it cannot be served."""
        params = params or SamplingParams()
        prompt_text, token_ids = self._tokenize(prompt)
        sched = self.config.scheduler
        request = Request(
            req_id=request_id if request_id is not None else f"req-{next(self._req_counter)}",
            prompt_token_ids=token_ids, sampling_params=params,
            arrival_s=self.clock.now() if arrival_s is None else arrival_s,
            ttft_slo_s=sched.ttft_slo_s if ttft_slo_s is None else ttft_slo_s,
            tbt_slo_s=sched.tbt_slo_s if tbt_slo_s is None else tbt_slo_s,
            eos_token_ids=self.model_config.eos_token_ids, prompt=prompt_text)
        self.scheduler.add_request(request)
        self._requests[request.req_id] = request
        if self.tokenizer is not None:
            self._detokenizers[request.req_id] = IncrementalDetokenizer(
                self.tokenizer, token_ids, params.stop, params.include_stop_str_in_output)
        return request

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty; send at least one token")
            if self.tokenizer is None:
                raise InvalidRequestError("this engine has no tokenizer; send token ids")
            try:
                return prompt, list(self.tokenizer(prompt).input_ids)
            except (TypeError, ValueError) as exc:  # e.g. a lone UTF-16 surrogate from JSON
                raise InvalidRequestError(f"the prompt cannot be tokenized: {exc}") from exc
        token_ids = list(prompt)
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"token ids must be integers in [0, {vocab})")
        return None, token_ids

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id)
        self._forget(request_id)

    def convert_request(self, request_id: str, kind: CacheKind) -> None:
        """Change a request's cache kind at the next step (see Scheduler.request_conversion)."""
        self.scheduler.request_conversion(request_id, kind)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # --- one iteration -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for every request that got a token or finished."""
        sched_out = self.scheduler.schedule(self.clock.now())
        if sched_out.is_empty:
            if sched_out.finished_req_ids or sched_out.conversions:  # aborted state; cache moves
                self.executor.execute(sched_out)
            return []
        try:
            runner_out = self.executor.execute(sched_out)
        except Exception as exc:  # a failing batch must not take the engine (or other requests) down
            logger.exception("step %d failed; aborting its %d requests", sched_out.step_id,
                             len(sched_out.scheduled))
            return self._fail_batch(sched_out, f"{type(exc).__name__}: {exc}")
        self.scheduler.update_from_output(sched_out, runner_out, self.clock.now())
        self.num_steps += 1
        outputs = []
        for scheduled in sched_out.scheduled:
            request = self._requests.get(scheduled.req_id)
            if scheduled.sample and request is not None and request.output_token_ids:
                outputs.append(self._process_new_tokens(request))
        return outputs

    def _fail_batch(self, sched_out: SchedulerOutput, error: str) -> list[RequestOutput]:
        outputs = []
        for scheduled in sched_out.scheduled:
            request = self._requests.get(scheduled.req_id)
            if request is None:
                continue
            self.scheduler.abort_request(request.req_id)
            output = self._make_output(request)
            output.error = error
            outputs.append(output)
            self._forget(request.req_id)
        return outputs

    def _process_new_tokens(self, request: Request) -> RequestOutput:
        detok = self._detokenizers.get(request.req_id)
        if detok is not None:
            stop = detok.add_tokens(request.output_token_ids[detok.num_token_ids_fed:])
            if stop is not None and not request.is_finished:
                request.stop_reason = stop
                self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)
        output = self._make_output(request)
        if request.is_finished:
            self._forget(request.req_id)
        return output

    def _make_output(self, request: Request) -> RequestOutput:
        detok = self._detokenizers.get(request.req_id)
        completion = CompletionOutput(0, detok.text if detok else "", list(request.output_token_ids),
                                      request.finish_reason, request.stop_reason)
        return RequestOutput(request.req_id, request.prompt, request.prompt_token_ids, [completion],
                             request.is_finished, _metrics(request))

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._detokenizers.pop(request_id, None)

    def stats(self) -> dict:
        """Queue lengths, cache usage by kind and counters, for logs and /metrics."""
        return {"num_running": self.scheduler.num_running, "num_waiting": self.scheduler.num_waiting,
                "cache_units_total": self.cache.num_units, "cache_units": self.cache.usage(),
                "num_preemptions": self.scheduler.num_preemptions,
                "num_conversions": self.scheduler.num_conversions, "num_steps": self.num_steps,
                "hybrid_cache": self.hybrid_cache}


def _metrics(request: Request) -> RequestMetrics:
    return RequestMetrics(request.arrival_s, request.first_scheduled_s, request.first_token_s,
                          list(request.token_times_s), request.num_preemptions, request.num_conversions)
