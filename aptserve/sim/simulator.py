"""Replay a trace through the real engine.step() on a simulated clock: the nearer of the next arrival
and the end of the running step is the next event. Policies are never re-implemented here."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from aptserve.bench.datasets import TraceRequest
from aptserve.bench.metrics import RequestRecord
from aptserve.config import ModelConfig
from aptserve.core.engine_core import build_engine_core
from aptserve.engine import Executor, LLMEngine
from aptserve.engine_args import EngineArgs
from aptserve.errors import InvalidRequestError
from aptserve.outputs import RequestOutput
from aptserve.sampling import RequestOutputKind, SamplingParams
from aptserve.sim.executor import CostModel, CostModelExecutor, LinearCostModel, SimClock


def sim_engine(args: EngineArgs, model_config: ModelConfig, cost_model: CostModel | None = None,
               make_executor: Callable[[SimClock, CostModel], Executor] = CostModelExecutor,
               ) -> tuple[LLMEngine, SimClock]:
    """The real engine, built by the same build_engine_core() as a served one (the hidden cache priced by the
    cost model unless args.alpha is given), on a simulated clock and a cost-model executor."""
    cost_model = cost_model or LinearCostModel()
    clock = SimClock()
    core = build_engine_core(args, model_config=model_config, make_executor=lambda _: make_executor(clock, cost_model),
                             clock=clock, measure_alpha=cost_model.alpha_s)
    return LLMEngine(core), clock


def simulate(engine: LLMEngine, clock: SimClock, trace: Sequence[TraceRequest],
             send_offsets_s: Sequence[float], max_num_steps: int = 10_000_000, progress=None,
             request_latency_s: float = 0.0) -> list[RequestRecord]:
    """Run every request of the trace to completion; one RequestRecord per request, in trace order.
    `progress`: a tqdm bar, advanced by one per request finished. `request_latency_s`: the served path's fixed
    latency (HTTP, tokenization, the hop to the engine and back), added to when each token reaches the client."""
    records: dict[int, RequestRecord] = {}
    next_index, num_steps = 0, 0
    start_s = clock.now()
    while next_index < len(trace) or engine.has_unfinished_requests():
        while next_index < len(trace) and start_s + send_offsets_s[next_index] <= clock.now():
            add_trace_request(engine, trace[next_index], next_index, start_s + send_offsets_s[next_index], records)
            next_index += 1
        if not engine.has_unfinished_requests():
            if next_index == len(trace):  # the last requests were refused: nothing is left to run
                break
            clock.time_s = max(clock.time_s, start_s + send_offsets_s[next_index])
            continue
        for output in engine.step():
            if output.finished:
                records[int(output.request_id)] = trace_record(output, trace[int(output.request_id)], request_latency_s)
                if progress is not None:
                    progress.update(1)
        num_steps += 1
        if num_steps > max_num_steps:
            raise RuntimeError(f"simulation did not drain in {max_num_steps} steps")
    return [records[i] for i in range(len(trace))]


def add_trace_request(engine: LLMEngine, request: TraceRequest, index: int, arrival_s: float,
                      records: dict[int, RequestRecord]) -> None:
    """The trace's request `index` (its id), greedy with ignore_eos; a request the engine refuses is recorded failed."""
    # A trace of lengths only gets distinct prompts, so that no two share a cached prefix by accident.
    prompt = request.prompt_token_ids or np.random.default_rng(index).integers(
        10, engine.config.model.vocab_size, request.prompt_len).tolist()
    params = SamplingParams(temperature=0, max_tokens=request.output_len, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    try:
        engine.add_request(prompt, params, request_id=str(index), arrival_s=arrival_s)
    except InvalidRequestError as exc:
        records[index] = RequestRecord(ok=False, prompt_len=request.prompt_len, output_len=0,
                                       send_s=arrival_s, error=str(exc))


def trace_record(output: RequestOutput, request: TraceRequest, latency_s: float) -> RequestRecord:
    metrics = output.metrics
    first_token_s = None if metrics.first_token_s is None else metrics.first_token_s + latency_s
    return RequestRecord(ok=output.error is None, prompt_len=request.prompt_len,
                         output_len=len(output.outputs[0].token_ids), send_s=metrics.arrival_s,
                         first_token_s=first_token_s, token_times_s=[t + latency_s for t in metrics.token_times_s],
                         error=output.error)
