"""AsyncLLM: the server's front end on the event loop (an EngineClient, server/engine_client.py): the door, the
output side and one stream per request, over an engine core in a thread (ThreadCore) or in a process of its own
(ProcessCore, what `aptserve serve` runs).

Tokenizing, detokenizing, stop strings and SSE happen here; the core only schedules and runs the model. Each
core step's outputs arrive on the event loop and go to per-request asyncio queues; a core that dies fails every
open request and turns /health and new requests away.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time

import msgspec

from aptserve.config import EngineConfig
from aptserve.core.engine_core import EngineCore
from aptserve.core.messages import EngineCoreOutputs, EngineCoreRequest, EngineStats, StepStats
from aptserve.core.snapshot import ReplicaSnapshot
from aptserve.errors import AptServeError, EngineOverloadedError, InvalidRequestError
from aptserve.grammar_compiler import GrammarCompiler
from aptserve.inputs import InputProcessor
from aptserve.output_processor import OutputProcessor
from aptserve.outputs import RequestOutput
from aptserve.sampling import SamplingParams
from aptserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
# Prompts longer than this (characters) are tokenized off the event loop, so streams never wait for them.
INLINE_TOKENIZE_CHARS = 20_000


class RequestFailedError(AptServeError):
    """The engine gave up on this request (its batch failed, or the engine stopped); others go on."""


class RequestCutError(RequestFailedError):
    """The server's drain ran out of time before this request finished."""


class ServerDrainingError(EngineOverloadedError):
    """The server is shutting down and accepts no new requests."""


class EngineDeadError(EngineOverloadedError):
    """The engine core has stopped; nothing more is served."""


class RequestStream:
    """The outputs of one request, pushed by the front end's output side, read by the one handler serving it."""

    def __init__(self, request_id: str, engine: AsyncLLM) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.error is not None:
            self.finished = True
            raise RequestFailedError(f"the engine failed on this request: {item.error}")
        self.finished = item.finished
        return item

    def close(self) -> None:
        """Abort the request unless it finished (client gone, handler failed); safe to call twice."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncLLM:
    def __init__(self, core, tokenizer, max_queue_len: int = 1024, log_step_stats: bool = False,
                 step_log: str | None = None, grammars: GrammarCompiler | None = None) -> None:
        self.core = core
        self.config: EngineConfig = core.config
        self.tokenizer = tokenizer
        self.max_queue_len = max_queue_len
        self.log_step_stats = log_step_stats
        # One JSON object per step (StepStats and the front end's output seconds), line-buffered so that a reader
        # sees whole lines while the server runs.
        self._step_log = open(step_log, "a", buffering=1, encoding="utf-8") if step_log else None
        self.input_processor = InputProcessor(self.config, tokenizer, grammars)
        # Requests with a constraint pass the door here, one at a time: compiling may take seconds of CPU.
        self._grammar_door = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aptserve-grammar")
        self.output_processor = OutputProcessor(tokenizer)
        self.stats = core.initial_stats()  # the core's gauges after its last step; /metrics reads only this
        self.metrics = ServerMetrics(lambda: self.stats, self.config)
        self.draining = False  # set on SIGTERM: new requests get 503, running ones finish
        self.dead_reason: str | None = None  # set when the engine core stopped for good
        self._streams: dict[str, RequestStream] = {}
        self._snapshot_waiters: list[asyncio.Future[tuple[ReplicaSnapshot, EngineStats]]] = []
        self._started = False

    @classmethod
    def launch(cls, engine_args, server_args) -> AsyncLLM:
        """What `aptserve serve` runs (and each cluster replica): the engine core in a process of its own, or with
        --engine-in-thread in a thread of this one; raises EngineStartError."""
        from aptserve.core.client import ProcessCore
        from aptserve.registry import load_model_config, load_tokenizer, resolve_model

        if server_args.engine_in_thread:
            from aptserve.core.engine_core import build_served_core

            core = build_served_core(engine_args)
            return cls.in_thread(core, load_tokenizer(core.config.model.path), server_args)
        model_path = resolve_model(engine_args.model)  # a known model's folder is built here, before the core reads it
        # The tokenizer (seconds of imports) loads while the core process starts and loads the weights.
        # So is the grammar compiler of the door (its tokenizer view: ~0.5 s).
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="aptserve-tokenizer") as pool:
            tokenizer = pool.submit(load_tokenizer, model_path)
            grammars = pool.submit(lambda: GrammarCompiler.for_model(load_model_config(model_path)))
            process_core = ProcessCore.launch(engine_args, log_level=logging.getLogger().level)
            return cls(process_core, tokenizer.result(), server_args.max_queue_len, server_args.log_step_stats,
                       server_args.step_log, grammars.result())

    @classmethod
    def in_thread(cls, core: EngineCore, tokenizer, server_args) -> AsyncLLM:
        """The front end over an engine core already built, stepped by a thread of this process."""
        from aptserve.core.client import ThreadCore

        return cls(ThreadCore(core), tokenizer, server_args.max_queue_len, server_args.log_step_stats,
                   server_args.step_log, core.grammar_compiler)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.core.start(self._on_outputs, self._on_death)
        self._started = True

    async def shutdown(self) -> None:
        """Stop the core; requests still open get an error."""
        self.core.stop()
        await asyncio.to_thread(self.core.shutdown)
        self._grammar_door.shutdown(wait=False, cancel_futures=True)
        self._fail_all("the server is shutting down")
        if self._step_log is not None:
            self._step_log.close()

    @property
    def is_running(self) -> bool:
        return self._started and self.dead_reason is None

    @property
    def num_unfinished(self) -> int:
        """Requests added and not yet finished or aborted (what a drain waits for)."""
        return len(self._streams)

    # --- requests ----------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          ttft_slo_s: float | None = None, tbt_slo_s: float | None = None) -> RequestStream:
        """Check, tokenize and queue a request; raises InvalidRequestError (400) or EngineOverloadedError (503)."""
        self.check_capacity()
        if params.structured is not None or isinstance(prompt, str) and len(prompt) > INLINE_TOKENIZE_CHARS:
            # The tokenizer and the grammar compiler release the GIL.
            door = self._grammar_door if params.structured is not None else None
            core_request, text = await asyncio.get_running_loop().run_in_executor(
                door, self._core_request, request_id, prompt, params, ttft_slo_s, tbt_slo_s)
            self.check_capacity()  # it may have changed meanwhile
        else:
            core_request, text = self._core_request(request_id, prompt, params, ttft_slo_s, tbt_slo_s)
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        self.output_processor.add_request(request_id, text, core_request.prompt_token_ids,
                                          core_request.sampling_params, core_request.arrival_s)
        self.core.add_request(core_request)
        return stream

    def _core_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                      ttft_slo_s: float | None, tbt_slo_s: float | None) -> tuple[EngineCoreRequest, str | None]:
        processed = self.input_processor.process(prompt, params)
        return EngineCoreRequest(request_id, processed.token_ids, processed.params, time.perf_counter(),
                                 ttft_slo_s, tbt_slo_s), processed.text

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.output_processor.abort(request_id)
            self.core.abort_requests([request_id])
            self.metrics.requests_finished.labels("abort").inc()

    async def snapshot(self) -> tuple[ReplicaSnapshot, EngineStats]:
        """The core's state for a router and its gauges, both taken between the same two steps (polls that overlap
        share one answer): a report whose gauges came from another moment could show a request the snapshot does
        not, and a router would act on a state its /metrics never showed."""
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine has stopped ({self.dead_reason})")
        waiter = asyncio.get_running_loop().create_future()
        self._snapshot_waiters.append(waiter)
        if len(self._snapshot_waiters) == 1:
            self.core.poll_snapshot()
        return await waiter

    @property
    def num_waiting(self) -> int:
        """Requests added and not yet running: those this front end holds (a finished or aborted one leaves at
        once) less those the core ran at its last step. The core's own waiting count would lag: it still holds a
        request the front end aborted, or one that finished, until it hears of it, and a client that sends its
        next request as soon as it has an answer would see that request counted twice."""
        return max(0, len(self._streams) - self.stats.num_running)

    def check_capacity(self, num_requests: int = 1) -> None:
        """Raise unless `num_requests` (a request's n choices) can be queued now: InvalidRequestError if they
        never could, EngineOverloadedError (503) if not now."""
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine has stopped ({self.dead_reason}); the server is going down")
        if self.draining:
            raise ServerDrainingError("the server is shutting down; send the request to another replica")
        if num_requests > self.max_queue_len:
            raise InvalidRequestError(
                f"n is {num_requests}, but each choice is a request and this server queues at most "
                f"{self.max_queue_len} (--max-queue-len); lower n")
        num_waiting = self.num_waiting
        if num_waiting + num_requests > self.max_queue_len:
            raise EngineOverloadedError(
                f"the server is overloaded: {num_waiting} requests are already waiting (--max-queue-len "
                f"{self.max_queue_len}); retry later")

    # --- the core's side (event loop) ----------------------------------------------------------
    def _on_outputs(self, core_outputs: EngineCoreOutputs) -> None:
        start_s = time.perf_counter()
        outputs, stopped = self.output_processor.process(core_outputs)
        self.core.abort_requests(stopped)
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if output.finished:
                self._streams.pop(output.request_id, None)
                self.metrics.observe_finished(output)
            if stream is not None:
                stream.put(output)
        if core_outputs.stats is not None:
            self.stats = core_outputs.stats
        if core_outputs.step is not None:
            self._observe_step(core_outputs.step, time.perf_counter() - start_s)
        if core_outputs.snapshot is not None:
            self._answer_snapshot_polls((core_outputs.snapshot, self.stats))

    def _answer_snapshot_polls(self, answer: tuple[ReplicaSnapshot, EngineStats] | BaseException) -> None:
        waiters, self._snapshot_waiters = self._snapshot_waiters, []
        for waiter in waiters:
            if waiter.done():
                continue  # its poller gave up
            if isinstance(answer, BaseException):
                waiter.set_exception(answer)
            else:
                waiter.set_result(answer)

    def _observe_step(self, step: StepStats, output_s: float) -> None:
        self.metrics.observe_step(step, output_s)
        if self._step_log is not None:
            line = {**msgspec.structs.asdict(step), "output_s": output_s, "logged_at": time.time()}
            self._step_log.write(json.dumps(line) + "\n")
        if self.log_step_stats:
            logger.info("step %d: %d requests (%d decodes, %d prefill tokens); schedule %.1f ms, prepare %.1f, "
                        "forward %.1f, sample %.1f, update %.1f, output %.1f, gap %.1f", step.step_id,
                        step.num_requests, step.num_decode_tokens, step.num_prefill_tokens, 1e3 * step.schedule_s,
                        1e3 * step.prepare_s, 1e3 * step.forward_s, 1e3 * step.sample_s, 1e3 * step.update_s,
                        1e3 * output_s, 1e3 * step.gap_s)

    def _on_death(self, reason: str) -> None:
        logger.error("%s: failing %d open requests", reason, len(self._streams))
        self.dead_reason = reason
        self._fail_all(reason)
        self._answer_snapshot_polls(EngineDeadError(f"the engine has stopped ({reason})"))

    def cut_unfinished(self) -> int:
        """End every open request now (the drain ran out of time): each gets a shutdown error. Returns how many."""
        request_ids = list(self._streams)
        if request_ids:
            logger.warning("shutdown timeout: cutting %d unfinished requests", len(request_ids))
            self.core.abort_requests(request_ids)
            self._fail_all("the server shut down before this request finished", RequestCutError)
        return len(request_ids)

    def _fail_all(self, reason: str, error_type: type[AptServeError] = RequestFailedError) -> None:
        for request_id, stream in list(self._streams.items()):
            self._streams.pop(request_id, None)
            self.output_processor.abort(request_id)
            self.metrics.requests_finished.labels("error").inc()
            stream.put(error_type(reason))
