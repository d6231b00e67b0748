"""EngineCore: the scheduler and the executor, one step at a time; requests in, token ids out.

build_engine_core() makes every one (offline, a server's thread or process, a replica, the simulator); the step
loop (loop.py) drives it in a thread or alone in the engine-core process, where no HTTP, tokenizer or detokenizer
shares its interpreter. Its scheduler owns each request's lifecycle, token stops included; stop strings need text
and are the front end's (output_processor.py), which aborts the request here.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from aptserve.config import EngineConfig, ModelConfig
from aptserve.core.grammar_gate import GrammarGate
from aptserve.core.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, EngineStats, StepStats
from aptserve.core.snapshot import ReplicaSnapshot, take_snapshot
from aptserve.engine_args import AlphaFn, EngineArgs, resolve
from aptserve.errors import ConversionFailedError
from aptserve.request import Request
from aptserve.sampling import SamplingParams
from aptserve.sched import create_scheduler
from aptserve.sched.output import RunnerOutput, ScheduledRequest, SchedulerOutput
from aptserve.sched.step_cost import StepCostFitter, attention_work

logger = logging.getLogger(__name__)

# How long a step with nothing to run but grammars compiling waits for one (instead of spinning).
GRAMMAR_WAIT_S = 0.01
# What a served core runs before its first request (warm_up): a prompt of each length, then decodes, one at a time.
# (prompt length, alternatives scored per prompt token or None). A long prompt, so the fit sees attention's
# quadratic cost (chunks of 256 tokens at most left it to noise: later chunks of a 1,000-token prompt then ran 1.4x
# their plan); the last prompt is scored as an echo request would be, so the first one served is planned with
# scoring's price.
WARM_UP_PROMPTS = ((768, None), (32, None), (128, 20))
WARM_UP_OUTPUT_TOKENS = 8
WARM_UP_MAX_STEPS = 64


class Executor(Protocol):
    def execute(self, sched_out: SchedulerOutput) -> RunnerOutput: ...


class Clock(Protocol):
    def now(self) -> float: ...


class WallClock:
    def now(self) -> float:
        return time.perf_counter()


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor, clock: Clock | None = None) -> None:
        self.config = config
        self.executor = executor
        self.clock = clock or WallClock()
        self.scheduler = create_scheduler(config)
        # Refits the scheduler's step-time model from every step run (the policies size prompt chunks with it).
        self.step_cost_fitter = StepCostFitter(self.scheduler.step_cost)
        self.num_steps = 0
        self._last_step_end_s = time.perf_counter()
        # Structured-output requests wait here, not in a step, while their grammar compiles (executors with a
        # GrammarBank: the ModelRunner's; the simulator's has none).
        bank = getattr(executor, "grammars", None)
        self.grammar_gate = GrammarGate(bank) if bank is not None and bank.compiler is not None else None
        self._refused: list[EngineCoreOutput] = []  # requests the gate dropped, told with the next outputs

    def warm_up(self) -> None:
        """Run a few real steps (prompt chunks and decodes) before serving and fit the step-time model on them, then
        start the scheduler afresh (no counters, no cached prefixes, no requests) with that model. Without it a fresh
        server sizes its first prompt chunks by a generic prior, 2x too large for this model on a 2-core CPU, and
        the requests already decoding wait through them."""
        max_prompt_len = self.config.model.max_model_len - WARM_UP_OUTPUT_TOKENS
        for index, (length, prompt_logprobs) in enumerate(WARM_UP_PROMPTS):
            params = SamplingParams(temperature=0.0, max_tokens=WARM_UP_OUTPUT_TOKENS, ignore_eos=True,
                                    prompt_logprobs=None if prompt_logprobs is None else
                                    min(prompt_logprobs, self.config.max_logprobs))
            token_ids = [(7 * i + 3) % self.config.model.vocab_size for i in range(min(length, max_prompt_len))]
            self.add_request(EngineCoreRequest(f"warm-up-{index}", token_ids, params, self.clock.now()))
            for _ in range(WARM_UP_MAX_STEPS):  # a pool too small for the prompt never admits it
                if not self.scheduler.has_unfinished_requests():
                    break
                self.step()
            else:
                self.abort_requests([f"warm-up-{index}"])
        self.step()  # hands the finished ids to the executor, which forgets their state
        self.step_cost_fitter.refit()
        self.step_cost_fitter.forget_chunk_margin()
        self.scheduler = create_scheduler(self.config)
        self.scheduler.step_cost = self.step_cost_fitter.model
        self.num_steps = 0
        logger.info("warm-up: %s", self.step_cost_fitter.model)

    @property
    def grammar_compiler(self):
        """The GrammarCompiler this core runs grammars with (None without one): an engine in one process shares it
        with its front end, so a constraint checked at the door is compiled once."""
        return self.grammar_gate.bank.compiler if self.grammar_gate is not None else None

    def add_request(self, core_request: EngineCoreRequest) -> Request:
        """Queue a request the front end has checked; raises InvalidRequestError for a duplicate id."""
        ttft_slo_s, tbt_slo_s = self.config.scheduler.request_slos(core_request.ttft_slo_s, core_request.tbt_slo_s)
        request = Request(
            request_id=core_request.request_id, prompt_token_ids=core_request.prompt_token_ids,
            sampling_params=core_request.sampling_params, arrival_s=core_request.arrival_s, ttft_slo_s=ttft_slo_s,
            tbt_slo_s=tbt_slo_s, eos_token_ids=self.config.model.eos_token_ids)
        if self.grammar_gate is None or self.grammar_gate.admit(request):
            self.scheduler.add_request(request)
        return request

    def abort_requests(self, request_ids: list[str]) -> None:
        if self.grammar_gate is not None:
            self.grammar_gate.abort(request_ids)
        for request_id in request_ids:
            self.scheduler.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.grammar_gate) or bool(self._refused)

    def _admit_compiled(self) -> None:
        """Move the requests whose grammar has compiled to the scheduler; with nothing else to run, wait a little
        for one first."""
        gate = self.grammar_gate
        if not gate:
            return
        if not self.scheduler.has_unfinished_requests():
            gate.wait(GRAMMAR_WAIT_S)
        for request in gate.ready(lambda request_id, error: self._refused.append(
                EngineCoreOutput(request_id, [], "abort", error=f"structured output: {error}"))):
            try:
                self.scheduler.add_request(request)
            except Exception as exc:  # a duplicate id: that request's refusal alone
                gate.bank.forget([request.request_id])
                self._refused.append(EngineCoreOutput(request.request_id, [], "abort", error=f"{exc}"))

    def step(self) -> EngineCoreOutputs | None:
        """One batch: schedule, execute, update (the scheduler appends tokens and finishes what they stop). None
        when nothing ran."""
        self._admit_compiled()
        refused, self._refused = self._refused, []
        start_s = time.perf_counter()
        sched_out = self.scheduler.schedule(self.clock.now())
        scheduled_s = time.perf_counter()
        if sched_out.is_empty:
            if sched_out.finished_request_ids or sched_out.conversions:  # aborted state; cache moves
                self.executor.execute(sched_out)
            self._last_step_end_s = time.perf_counter()
            return EngineCoreOutputs(self.clock.now(), refused, stats=self.stats()) if refused else None
        num_tokens = sched_out.total_num_scheduled_tokens
        try:
            runner_out = self.executor.execute(sched_out)
            executed_s = time.perf_counter()
        except Exception as exc:  # a failing request must not take the engine, or the rest of its batch, down
            logger.exception("step %d failed; isolating the failing requests among its %d", sched_out.step_id,
                             len(sched_out.scheduled))
            runner_out = self._isolate_failures(sched_out, exc)
            executed_s = time.perf_counter()
        else:  # a step re-run in parts says nothing about the cost of one step
            self._learn_step_cost(sched_out, num_tokens, runner_out)
        failures = [self._fail(request_id, error) for request_id, error in runner_out.failed.items()]
        now = self.clock.now()
        sampled = self.scheduler.update_from_output(sched_out, runner_out, now)
        outputs = [self._output(request, runner_out) for request in sampled] + failures + refused
        self.num_steps += 1
        end_s = time.perf_counter()
        step = _step_stats(sched_out, num_tokens, runner_out, start_s - self._last_step_end_s, scheduled_s - start_s,
                           executed_s - scheduled_s, end_s - executed_s)
        self._last_step_end_s = end_s
        return EngineCoreOutputs(now, outputs, step, self.stats())

    def _learn_step_cost(self, sched_out: SchedulerOutput, num_tokens: int, runner_out: RunnerOutput) -> None:
        work = sum(attention_work(r.start_pos, r.num_tokens) for r in sched_out.scheduled)
        seconds = runner_out.prepare_s + runner_out.forward_s + runner_out.sample_s
        self.step_cost_fitter.observe(num_tokens, work, seconds, sched_out.num_recompute_tokens,
                                      sched_out.num_scored_tokens)
        self.scheduler.step_cost = self.step_cost_fitter.model

    def _output(self, request: Request, runner_out: RunnerOutput) -> EngineCoreOutput:
        """What the front end hears of a request that got a token this step (and finished, if it did)."""
        first, request_id = request.num_output_tokens == 1, request.request_id
        return EngineCoreOutput(
            request_id, request.output_token_ids[-1:], request.finish_reason, request.stop_token_id,
            first_scheduled_s=request.first_scheduled_s if first else None,
            num_preemptions=request.num_preemptions, num_conversions=request.num_conversions,
            num_cached_tokens=request.num_cached_tokens if first else 0,
            new_logprobs=[runner_out.logprobs[request_id]] if request_id in runner_out.logprobs else None,
            prompt_logprobs=request.prompt_logprobs if first and request.sampling_params.prompt_logprobs is not None
            else None)

    def _isolate_failures(self, sched_out: SchedulerOutput, exc: Exception) -> RunnerOutput:
        """Run a failed step again in halves until each failing request is alone: those fail, the others get
        their tokens. Re-running is safe: a request's forward only writes its own cache rows, at the same
        positions. Conversions are not re-run; if they failed, the converted requests fail (their rows are lost)."""
        out = RunnerOutput()
        scheduled = sched_out.scheduled
        if isinstance(exc, ConversionFailedError):
            lost = set(exc.request_ids)
            out.failed.update((request_id, "its cache could not be converted") for request_id in lost)
            scheduled = [r for r in scheduled if r.request_id not in lost]
            if scheduled:
                self._execute_parts(sched_out, [scheduled], out)
        else:
            self._bisect(sched_out, scheduled, f"{type(exc).__name__}: {exc}", out)
        return out

    def _bisect(self, step: SchedulerOutput, scheduled: list[ScheduledRequest], error: str,
                out: RunnerOutput) -> None:
        if len(scheduled) == 1:
            out.failed[scheduled[0].request_id] = error
            return
        middle = len(scheduled) // 2
        self._execute_parts(step, [scheduled[:middle], scheduled[middle:]], out)

    def _execute_parts(self, step: SchedulerOutput, parts: list[list[ScheduledRequest]], out: RunnerOutput) -> None:
        """Parts of `step`'s requests, each run as a step of its own (on the scratch units `step` lends)."""
        for part in parts:
            try:
                part_out = self.executor.execute(SchedulerOutput(step.step_id, part,
                                                                 scratch_unit_ids=step.scratch_unit_ids))
            except Exception as exc:
                self._bisect(step, part, f"{type(exc).__name__}: {exc}", out)
            else:
                out.sampled_token_ids.update(part_out.sampled_token_ids)
                out.failed.update(part_out.failed)
                out.logprobs.update(part_out.logprobs)
                out.prompt_logprobs.update(part_out.prompt_logprobs)

    def _fail(self, request_id: str, error: str) -> EngineCoreOutput:
        """Finish one request with an error (its cache goes back to the pool); the front end reports it."""
        logger.error("request %s failed: %s", request_id, error)
        self.scheduler.abort_request(request_id)
        return EngineCoreOutput(request_id, [], "abort", error=error)

    def idle_stats(self) -> EngineCoreOutputs | None:
        """The gauges alone when no step will follow to carry them (after aborts emptied the engine), so the
        front end's view of the pool does not keep units that are free."""
        return None if self.has_unfinished_requests() else EngineCoreOutputs(self.clock.now(), stats=self.stats())

    def refusal(self, request_id: str, error: str) -> EngineCoreOutputs:
        """The outputs that tell the front end a request it sent was not taken."""
        return EngineCoreOutputs(self.clock.now(), [EngineCoreOutput(request_id, [], "abort", error=error)],
                                 stats=self.stats())

    def fail_all(self, error: str) -> EngineCoreOutputs:
        """Abort every request (the loop hit a bug outside a batch); each one's front end gets `error`."""
        request_ids = list(self.scheduler.requests) + (self.grammar_gate.request_ids if self.grammar_gate else [])
        self.abort_requests(request_ids)
        outputs = [EngineCoreOutput(request_id, [], "abort", error=error) for request_id in request_ids]
        return EngineCoreOutputs(self.clock.now(), outputs, stats=self.stats())

    def stats(self) -> EngineStats:
        scheduler, cache = self.scheduler, self.scheduler.cache
        num_waiting = scheduler.num_waiting + len(self.grammar_gate or ())  # compiling counts as waiting
        return EngineStats(scheduler.num_running, num_waiting, cache.num_units, cache.usage(),
                           scheduler.num_preemptions, scheduler.num_conversions, self.num_steps,
                           self.config.cache.hybrid.value, scheduler.num_prefix_query_tokens,
                           scheduler.num_prefix_hit_tokens, dict(scheduler.num_admissions),
                           scheduler.num_demotions)

    def snapshot(self, replica_id: str = "", taken_s: float = 0.0) -> ReplicaSnapshot:
        """What a router polls: queues, free memory and the fitted step cost, taken now."""
        return take_snapshot(self.scheduler, self.config, replica_id, taken_s, self.step_cost_fitter.fitted)


def _step_stats(sched_out: SchedulerOutput, num_tokens: int, runner_out: RunnerOutput, gap_s: float,
                schedule_s: float, execute_s: float, update_s: float) -> StepStats:
    num_decode = sum(1 for r in sched_out.scheduled if r.num_tokens == 1)
    # Executors that do not time their phases (the simulator's) count the whole call as forward time.
    forward_s = runner_out.forward_s or max(0.0, execute_s - runner_out.prepare_s - runner_out.sample_s)
    return StepStats(sched_out.step_id, len(sched_out.scheduled), num_decode,
                     num_tokens - num_decode, schedule_s, runner_out.prepare_s, forward_s,
                     runner_out.sample_s, update_s, max(0.0, gap_s), sched_out.num_context_tokens,
                     sched_out.num_recompute_tokens, runner_out.num_threads)


def build_served_core(args: EngineArgs) -> EngineCore:
    """build_engine_core() for a server (its own process or thread, a replica), warmed up unless args say not."""
    core = build_engine_core(args)
    if args.warm_up:
        core.warm_up()
    return core


def build_engine_core(args: EngineArgs, *, model_config: ModelConfig | None = None,
                      make_executor: Callable[[EngineConfig], Executor] | None = None, clock: Clock | None = None,
                      measure_alpha: AlphaFn | None = None) -> EngineCore:
    """The one way to make an engine core: the flags resolved into its config, an executor for that config (default:
    the torch ModelRunner on the model's weights) and a clock (default: the wall's). The simulator passes the model's
    geometry, its cost-model executor, its clock and how its cost model prices the hidden cache."""
    config = resolve(args, model_config, measure_alpha)
    if make_executor is None:
        from aptserve.runner import ModelRunner

        make_executor = ModelRunner.from_config
    return EngineCore(config, make_executor(config), clock)
