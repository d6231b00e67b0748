"""LLMEngine: step() = schedule -> execute -> update requests -> outputs.

The engine depends on two small protocols so the simulator can drive the very same step():
an Executor (the torch ModelRunner, or a cost model) and a Clock (wall or simulated).
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Protocol

from aptserve.cache.manager import CacheKind, CacheManager
from aptserve.config import EngineConfig, HybridMode
from aptserve.engine_args import EngineArgs, resolve
from aptserve.inputs import InputProcessor
from aptserve.output_processor import OutputProcessor
from aptserve.outputs import RequestOutput
from aptserve.request import Request
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
    def __init__(self, config: EngineConfig, executor: Executor, tokenizer=None, clock: Clock | None = None) -> None:
        self.config = config
        self.executor = executor
        self.tokenizer = tokenizer
        self.clock = clock or WallClock()
        self.scheduler = create_scheduler(config)
        self.input_processor = InputProcessor(config.model, tokenizer)
        self.output_processor = OutputProcessor(tokenizer, config.model.max_model_len)
        self._request_counter = itertools.count()
        self.num_steps = 0

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        """Resolve the flags, load the weights and the tokenizer: the engine on the real model."""
        from aptserve.registry import load_tokenizer
        from aptserve.runner import ModelRunner

        config = resolve(args)
        return cls(config, ModelRunner.from_config(config), load_tokenizer(config.model.path))

    @property
    def cache(self) -> CacheManager:
        return self.scheduler.cache

    @property
    def hybrid_cache(self) -> HybridMode:
        return self.config.cache.hybrid

    # --- requests ----------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_s: float | None = None,
                    ttft_slo_s: float | None = None, tbt_slo_s: float | None = None) -> Request:
        """Queue a request; raises InvalidRequestError (nothing queued) when it cannot be served."""
        processed = self.input_processor.process(prompt, params or SamplingParams())
        sched = self.config.scheduler
        request = Request(
            request_id=request_id if request_id is not None else f"req-{next(self._request_counter)}",
            prompt_token_ids=processed.token_ids, sampling_params=processed.params,
            arrival_s=self.clock.now() if arrival_s is None else arrival_s,
            ttft_slo_s=sched.ttft_slo_s if ttft_slo_s is None else ttft_slo_s,
            tbt_slo_s=sched.tbt_slo_s if tbt_slo_s is None else tbt_slo_s,
            eos_token_ids=self.config.model.eos_token_ids, prompt=processed.text)
        self.scheduler.add_request(request)
        self.output_processor.add_request(request)
        return request

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id)
        self.output_processor.forget(request_id)

    def convert_request(self, request_id: str, kind: CacheKind) -> None:
        """Change a request's cache kind at the next step (see Scheduler.request_conversion)."""
        self.scheduler.request_conversion(request_id, kind)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # --- one iteration -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; returns the outputs of requests that got a token or finished (per output kind)."""
        sched_out = self.scheduler.schedule(self.clock.now())
        if sched_out.is_empty:
            if sched_out.finished_request_ids or sched_out.conversions:  # aborted state; cache moves
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
        sampled = [scheduled.request_id for scheduled in sched_out.scheduled if scheduled.sample]
        return self.output_processor.process(sampled, self.scheduler.finish_request)

    def _fail_batch(self, sched_out: SchedulerOutput, error: str) -> list[RequestOutput]:
        outputs = []
        for scheduled in sched_out.scheduled:
            self.scheduler.abort_request(scheduled.request_id)
            output = self.output_processor.fail(scheduled.request_id, error)
            if output is not None:
                outputs.append(output)
        return outputs

    def stats(self) -> dict:
        """Queue lengths, cache usage by kind and counters, for logs and /metrics."""
        return {"num_running": self.scheduler.num_running, "num_waiting": self.scheduler.num_waiting,
                "cache_units_total": self.cache.num_units, "cache_units": self.cache.usage(),
                "num_preemptions": self.scheduler.num_preemptions,
                "num_conversions": self.scheduler.num_conversions, "num_steps": self.num_steps,
                "hybrid_cache": self.hybrid_cache.value}
