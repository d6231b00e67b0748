"""LLMEngine: the whole engine in one process: the door (inputs.py), the core (core/engine_core.py) and the
output side (output_processor.py). step() = schedule -> execute -> update requests -> outputs.

The offline LLM, the simulator and the tests drive it directly; the server runs the same three parts with the
core in a process of its own (server/async_llm.py). Every core comes from build_engine_core(); it depends on two
small protocols, an Executor (the torch ModelRunner, or a cost model) and a Clock (wall or simulated), so the
simulator drives the very same step().
"""
from __future__ import annotations

import itertools

from aptserve.cache.manager import CacheManager
from aptserve.cache.tables import CacheKind
from aptserve.config import EngineConfig, HybridMode
from aptserve.core.engine_core import Clock, EngineCore, Executor, WallClock, build_engine_core
from aptserve.core.messages import EngineCoreOutputs, EngineCoreRequest, EngineStats
from aptserve.engine_args import EngineArgs
from aptserve.inputs import InputProcessor
from aptserve.output_processor import OutputProcessor
from aptserve.outputs import RequestOutput
from aptserve.request import Request
from aptserve.sampling import SamplingParams
from aptserve.sched.base import Scheduler

__all__ = ["Clock", "Executor", "LLMEngine", "WallClock"]


class LLMEngine:
    def __init__(self, core: EngineCore, tokenizer=None) -> None:
        """Over a core from build_engine_core(); without a tokenizer, prompts and outputs are token ids only."""
        self.config: EngineConfig = core.config
        self.tokenizer = tokenizer
        self.core = core
        self.input_processor = InputProcessor(self.config, tokenizer, core.grammar_compiler)  # one compiler
        self.output_processor = OutputProcessor(tokenizer)
        self._request_counter = itertools.count()
        # The last step's accounting and gauges (None before the first step).
        self.last_step_outputs: EngineCoreOutputs | None = None

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        """Resolve the flags, load the weights and the tokenizer: the engine on the real model."""
        from aptserve.registry import load_tokenizer

        core = build_engine_core(args)
        return cls(core, load_tokenizer(core.config.model.path))

    # --- the parts, for callers that look inside ---------------------------------------------
    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def cache(self) -> CacheManager:
        return self.core.scheduler.cache

    @property
    def executor(self) -> Executor:
        return self.core.executor

    @executor.setter
    def executor(self, executor: Executor) -> None:
        self.core.executor = executor

    @property
    def clock(self) -> Clock:
        return self.core.clock

    @property
    def hybrid_cache(self) -> HybridMode:
        return self.config.cache.hybrid

    @property
    def num_steps(self) -> int:
        return self.core.num_steps

    # --- requests ----------------------------------------------------------------------------
    def core_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                     request_id: str | None = None, arrival_s: float | None = None, ttft_slo_s: float | None = None,
                     tbt_slo_s: float | None = None) -> tuple[EngineCoreRequest, str | None]:
        """Check and tokenize a request at the door (raises InvalidRequestError): the core request, the text."""
        processed = self.input_processor.process(prompt, params or SamplingParams())
        request_id = request_id if request_id is not None else f"req-{next(self._request_counter)}"
        arrival_s = self.clock.now() if arrival_s is None else arrival_s
        return EngineCoreRequest(request_id, processed.token_ids, processed.params, arrival_s, ttft_slo_s,
                                 tbt_slo_s), processed.text

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_s: float | None = None,
                    ttft_slo_s: float | None = None, tbt_slo_s: float | None = None) -> Request:
        """Queue a request; raises InvalidRequestError (nothing queued) when it cannot be served."""
        core_request, text = self.core_request(prompt, params, request_id, arrival_s, ttft_slo_s, tbt_slo_s)
        request = self.core.add_request(core_request)
        self.output_processor.add_request(core_request.request_id, text, core_request.prompt_token_ids,
                                          core_request.sampling_params, core_request.arrival_s)
        return request

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests([request_id])
        self.output_processor.abort(request_id)

    def convert_request(self, request_id: str, kind: CacheKind) -> None:
        """Change a request's cache kind at the next step (see Scheduler.request_conversion)."""
        self.scheduler.request_conversion(request_id, kind)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    # --- one iteration -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; returns the outputs of requests that got a token or finished (per output kind)."""
        core_outputs = self.core.step()
        if core_outputs is None:
            return []
        self.last_step_outputs = core_outputs
        outputs, stopped = self.output_processor.process(core_outputs)
        self.core.abort_requests(stopped)
        return outputs

    def stats(self) -> EngineStats:
        """Queue lengths, cache usage by kind and counters, for logs and /metrics."""
        return self.core.stats()
