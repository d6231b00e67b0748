"""The stops a request's tokens decide: a stop token, EOS, max_tokens, the context limit. Stop strings need the
text and are the front end's (output_processor.py); a request one ends is aborted in the core."""
from __future__ import annotations

from aptserve.request import Request, RequestStatus


def check_stop(request: Request, max_model_len: int) -> tuple[RequestStatus, int | None] | None:
    """(finish status, the stop token that ended it) if the request's last token ends it, else None."""
    token_id = request.output_token_ids[-1]
    params = request.sampling_params
    if token_id in params.stop_token_ids:
        return RequestStatus.FINISHED_STOPPED, token_id
    if not params.ignore_eos and token_id in request.eos_token_ids:
        return RequestStatus.FINISHED_STOPPED, None
    if request.num_output_tokens >= params.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH, None
    return None
