"""After each step: detokenize the new tokens, decide every stop, and build the outputs the caller asked for.

All stop rules live in `check_stop` (stop token ids, EOS, stop strings, max_tokens, max_model_len); the
scheduler only appends tokens. Outputs follow each request's `output_kind`, so a stream gets deltas (O(new
tokens) per step) and an offline batch gets one output per request at the end.
"""
from __future__ import annotations

from dataclasses import dataclass

from aptserve.detokenizer import IncrementalDetokenizer
from aptserve.outputs import CompletionOutput, RequestOutput, RequestStats
from aptserve.request import Request, RequestStatus
from aptserve.sampling import RequestOutputKind


def check_stop(request: Request, stop_string: str | None,
               max_model_len: int) -> tuple[RequestStatus, int | str | None] | None:
    """(finish status, stop reason) if the request's last token ends it, else None."""
    token_id = request.output_token_ids[-1]
    params = request.sampling_params
    if token_id in params.stop_token_ids:
        return RequestStatus.FINISHED_STOPPED, token_id
    if not params.ignore_eos and token_id in request.eos_token_ids:
        return RequestStatus.FINISHED_STOPPED, None
    if request.num_output_tokens >= params.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH, None
    if stop_string is not None:
        return RequestStatus.FINISHED_STOPPED, stop_string
    return None


@dataclass
class _RequestState:
    request: Request
    detokenizer: IncrementalDetokenizer | None
    num_tokens_seen: int = 0  # output tokens already detokenized and stop-checked
    num_tokens_sent: int = 0  # output tokens already in a DELTA output


class OutputProcessor:
    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._states: dict[str, _RequestState] = {}

    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.stop,
                                                 params.include_stop_str_in_output)
        self._states[request.request_id] = _RequestState(request, detokenizer)

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def process(self, request_ids: list[str], finish) -> list[RequestOutput]:
        """Outputs of the requests that got new tokens this step; `finish(request, status)` ends one."""
        outputs = []
        for request_id in request_ids:
            state = self._states.get(request_id)
            if state is None or state.request.num_output_tokens == state.num_tokens_seen:
                continue  # aborted, or no new token (preempted mid-step)
            output = self._process_new_tokens(state, finish)
            if output is not None:
                outputs.append(output)
        return outputs

    def _process_new_tokens(self, state: _RequestState, finish) -> RequestOutput | None:
        request = state.request
        new_token_ids = request.output_token_ids[state.num_tokens_seen:]
        state.num_tokens_seen = request.num_output_tokens
        stop_string = state.detokenizer.add_tokens(new_token_ids) if state.detokenizer else None
        stop = check_stop(request, stop_string, self.max_model_len)
        if stop is not None:
            request.stop_reason = stop[1]
            finish(request, stop[0])
        output = self._output(state)
        if request.is_finished:
            self.forget(request.request_id)
        return output

    def fail(self, request_id: str, error: str) -> RequestOutput | None:
        """The last output of a request the engine gave up on (its batch failed)."""
        state = self._states.pop(request_id, None)
        return None if state is None else self._output(state, error)

    def _output(self, state: _RequestState, error: str | None = None) -> RequestOutput | None:
        """The output of a request in its output kind (None: nothing to send yet, FINAL_ONLY)."""
        request, detokenizer = state.request, state.detokenizer
        finished = request.is_finished or error is not None
        kind = request.sampling_params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if kind == RequestOutputKind.DELTA:
            token_ids = request.output_token_ids[state.num_tokens_sent:]
            text = detokenizer.take_new_text(finished) if detokenizer else ""
        else:
            token_ids = list(request.output_token_ids)
            text = detokenizer.text if detokenizer else ""
        state.num_tokens_sent = request.num_output_tokens
        completion = CompletionOutput(0, text, token_ids, request.finish_reason, request.stop_reason)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, [completion], finished,
                             _stats(request) if finished else None, error, request.num_output_tokens)


def _stats(request: Request) -> RequestStats:
    return RequestStats(request.arrival_s, request.first_scheduled_s, request.first_token_s,
                        list(request.token_times_s), request.num_preemptions, request.num_conversions)
