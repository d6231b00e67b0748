"""The front end's side of each step: detokenize new tokens, stop on strings, build the outputs asked for.

The engine core decides the stops that depend on tokens (core/engine_core.py::check_stop); stop strings need the
text, so they are decided here, and a request they end is aborted in the core. Outputs follow each request's
`output_kind`: a stream gets deltas (O(new tokens) per step), an offline batch one output per request at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from aptserve.core.messages import EngineCoreOutput, EngineCoreOutputs
from aptserve.detokenizer import IncrementalDetokenizer
from aptserve.logprobs import TokenLogprobs
from aptserve.outputs import CompletionOutput, RequestOutput, RequestStats
from aptserve.sampling import RequestOutputKind, SamplingParams


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float
    detokenizer: IncrementalDetokenizer | None
    output_token_ids: list[int] = field(default_factory=list)
    token_times_s: list[float] = field(default_factory=list)
    first_scheduled_s: float | None = None
    num_preemptions: int = 0
    num_conversions: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_tokens_sent: int = 0  # output tokens already in a DELTA output
    logprobs: list[TokenLogprobs] | None = None  # one per output token, if the request asked for them
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 1.., if asked for

    def stats(self) -> RequestStats:
        first_token_s = self.token_times_s[0] if self.token_times_s else None
        return RequestStats(self.arrival_s, self.first_scheduled_s, first_token_s, self.token_times_s,
                            self.num_preemptions, self.num_conversions)


class OutputProcessor:
    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_s: float) -> None:
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop,
                                                 params.include_stop_str_in_output)
        self._states[request_id] = _RequestState(request_id, prompt, prompt_token_ids, params, arrival_s, detokenizer,
                                                 logprobs=[] if params.logprobs is not None else None)

    def abort(self, request_id: str) -> None:
        """Forget a request that ends without an output (client gone)."""
        self._states.pop(request_id, None)

    @property
    def num_unfinished(self) -> int:
        return len(self._states)

    def process(self, core_outputs: EngineCoreOutputs) -> tuple[list[RequestOutput], list[str]]:
        """The outputs to hand out, and the ids of requests a stop string ended (to abort in the core)."""
        outputs, stopped = [], []
        for core_output in core_outputs.outputs:
            state = self._states.get(core_output.request_id)
            if state is None:
                continue  # aborted here, or already ended by a stop string
            if self._update(state, core_output, core_outputs.timestamp_s):
                stopped.append(state.request_id)
            output = self._output(state, core_output.error)
            if output is not None:
                outputs.append(output)
                if output.finished:
                    del self._states[state.request_id]
        return outputs, stopped

    def _update(self, state: _RequestState, core_output: EngineCoreOutput, timestamp_s: float) -> bool:
        """Take in one core output; True when a stop string ended the request here."""
        state.output_token_ids.extend(core_output.new_token_ids)
        state.token_times_s.extend([timestamp_s] * len(core_output.new_token_ids))
        if state.logprobs is not None and core_output.new_logprobs:
            state.logprobs.extend(core_output.new_logprobs)
        if core_output.prompt_logprobs is not None:
            state.prompt_logprobs = core_output.prompt_logprobs
        if core_output.first_scheduled_s is not None:
            state.first_scheduled_s = core_output.first_scheduled_s
            state.num_cached_tokens = core_output.num_cached_tokens
        state.num_preemptions, state.num_conversions = core_output.num_preemptions, core_output.num_conversions
        stop_string = None
        if state.detokenizer is not None and core_output.new_token_ids:
            # As vLLM: no stop string ends a request before min_tokens.
            stop_string = state.detokenizer.add_tokens(core_output.new_token_ids,
                                                       len(state.output_token_ids) > state.params.min_tokens)
        if core_output.finish_reason is not None:  # a token stop wins over a string the same token completes
            state.finish_reason, state.stop_reason = core_output.finish_reason, core_output.stop_reason
            return False
        if stop_string is not None:
            state.finish_reason, state.stop_reason = "stop", stop_string
            return True
        return False

    def _output(self, state: _RequestState, error: str | None) -> RequestOutput | None:
        """The request's output in its output kind (None: nothing to hand out yet, FINAL_ONLY)."""
        finished = state.finish_reason is not None or error is not None
        kind = state.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        detokenizer = state.detokenizer
        first = state.num_tokens_sent if kind == RequestOutputKind.DELTA else 0
        token_ids = state.output_token_ids[first:]
        logprobs = state.logprobs[first:] if state.logprobs is not None else None
        if detokenizer is None:
            text = ""
        else:
            text = detokenizer.take_new_text(finished) if kind == RequestOutputKind.DELTA else detokenizer.text
        prompt_logprobs = state.prompt_logprobs if first == 0 else None  # a stream gets them once, first
        state.num_tokens_sent = len(state.output_token_ids)
        completion = CompletionOutput(0, text, token_ids, state.finish_reason or ("abort" if error else None),
                                      state.stop_reason, logprobs)
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, [completion], finished,
                             state.stats() if finished else None, error, len(state.output_token_ids),
                             state.num_cached_tokens, prompt_logprobs)
