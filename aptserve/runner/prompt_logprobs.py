"""Log probabilities of prompt tokens (completions' `echo` with `logprobs`): token t's comes from the logits of the
row at position t - 1, so a chunk covering positions [s, e) scores prompt tokens s + 1 .. e (never past the prompt's
last token, whose logits are the first sample's). The model's raw distribution, in slices of rows so that a long
chunk never holds [chunk, vocab] logits at once."""
from __future__ import annotations

import torch

from aptserve.logprobs import TokenLogprobs
from aptserve.sched.output import ScheduledRequest

ROWS_PER_SLICE = 128


def wants_prompt_logprobs(request: ScheduledRequest) -> bool:
    return (request.sampling_params.prompt_logprobs is not None and request.prompt_token_ids is not None
            and request.start_pos < len(request.prompt_token_ids) - 1)


def prompt_logprobs(model, hidden: torch.Tensor, request: ScheduledRequest,
                    first_row: int) -> tuple[int, list[TokenLogprobs]]:
    """(position of the first prompt token scored, one TokenLogprobs per token scored)."""
    prompt, k = request.prompt_token_ids, request.sampling_params.prompt_logprobs
    end = min(request.start_pos + request.num_tokens, len(prompt) - 1)  # positions whose next token is in the prompt
    scored: list[TokenLogprobs] = []
    for start in range(request.start_pos, end, ROWS_PER_SLICE):
        stop = min(end, start + ROWS_PER_SLICE)
        rows = hidden[first_row + start - request.start_pos:first_row + stop - request.start_pos]
        logprobs = torch.log_softmax(model.compute_logits(rows).float(), dim=-1)
        targets = torch.tensor(prompt[start + 1:stop + 1], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])
        ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
        top_lp, top_ids = logprobs.topk(k, dim=1)
        scored += [TokenLogprobs(t, lp, rank, ids, lps) for t, lp, rank, ids, lps
                   in zip(targets.tolist(), chosen[:, 0].tolist(), ranks, top_ids.tolist(), top_lp.tolist())]
    return request.start_pos + 1, scored
