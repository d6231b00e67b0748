"""The logits processing of the sampler, each a batched tensor op over the rows whose params use it.

Definitions (vLLM's, which follow the OpenAI API and the CTRL paper for the repetition penalty):
- min_tokens: while a request has fewer outputs than min_tokens, EOS and its stop_token_ids get -inf.
- logit_bias: added to the given tokens' logits.
- repetition_penalty r: every token seen in the prompt or the output so far has its logit divided by r if positive,
  multiplied by r otherwise.
- frequency_penalty f, presence_penalty p: logit -= f * (times the token is in the output) + p * (it is there at all).
- min_p m (after temperature): tokens whose probability is below m times the most likely one's get -inf.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from aptserve.sched.output import ScheduledRequest

# Most likely tokens top-k / top-p look among before sorting a whole row.
TOP_CANDIDATES = 256


def apply_constraints(logits: torch.Tensor, rows: Sequence[ScheduledRequest],
                      eos_token_ids: Sequence[int]) -> torch.Tensor:
    """min_tokens, logit_bias and the penalties, on a copy of `logits` (returned as is when no row uses them)."""
    params = [r.sampling_params for r in rows]
    banned = [i for i, r in enumerate(rows) if len(r.output_token_ids or ()) < r.sampling_params.min_tokens]
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    penalized = [i for i, p in enumerate(params) if p.has_penalties]
    if not (banned or biased or penalized):
        return logits
    logits = logits.float().clone()  # a failed batch is re-sampled row by row from the same logits
    device = logits.device
    if banned:
        pairs = [(i, t) for i in banned for t in (*eos_token_ids, *params[i].stop_token_ids)]
        if pairs:
            row_ids, token_ids = torch.tensor(pairs, device=device).T
            logits[row_ids, token_ids] = float("-inf")
    if biased:
        triples = [(i, t, b) for i in biased for t, b in params[i].logit_bias.items()]
        row_ids = torch.tensor([i for i, _, _ in triples], device=device)
        token_ids = torch.tensor([t for _, t, _ in triples], device=device)
        logits.index_put_((row_ids, token_ids), torch.tensor([b for *_, b in triples], device=device),
                          accumulate=True)
    if penalized:
        logits[penalized] = _apply_penalties(logits[penalized], [rows[i] for i in penalized])
    return logits


def _apply_penalties(logits: torch.Tensor, rows: list[ScheduledRequest]) -> torch.Tensor:
    device = logits.device
    output_counts = _token_counts([r.output_token_ids or [] for r in rows], logits.shape[1], device)
    params = [r.sampling_params for r in rows]
    repetition = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    if (repetition != 1).any():
        seen = (output_counts > 0) | (_token_counts([r.prompt_token_ids or [] for r in rows], logits.shape[1],
                                                    device) > 0)
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    return logits - frequency * output_counts - presence * (output_counts > 0)


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab]: how many times each token is in each row's list."""
    counts = torch.zeros(len(token_lists), vocab_size, device=device)
    lengths = torch.tensor([len(tokens) for tokens in token_lists], device=device)
    if int(lengths.sum()):
        row_ids = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
        token_ids = torch.tensor([t for tokens in token_lists for t in tokens], device=device)
        counts.index_put_((row_ids, token_ids), torch.ones(len(token_ids), device=device), accumulate=True)
    return counts


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """-inf where a token's probability is below min_p x the row's highest (the most likely token always stays)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k (0 = off) and top-p nucleus to -inf. Rows whose top-k and nucleus lie
    within the TOP_CANDIDATES most likely tokens (nearly all, for a trained model) are done from those alone; sorting
    the whole vocabulary, as the rest need, costs ten times more at batch 32."""
    vocab = logits.shape[-1]
    width = min(vocab, TOP_CANDIDATES)
    k = torch.where(top_k > 0, top_k, vocab)
    values, order = logits.topk(width, dim=-1)  # sorted, most likely first
    rank = torch.arange(width, device=logits.device)
    values.masked_fill_(rank >= k[:, None], float("-inf"))
    # Each candidate's probability under the row's top-k renormalization: the normalizer is over the candidates when
    # the top-k fits among them, else over the whole row (top_k off).
    normalizer = torch.where(k[:, None] <= width, torch.logsumexp(values, dim=-1, keepdim=True),
                             torch.logsumexp(logits, dim=-1, keepdim=True))
    probs = torch.exp(values - normalizer)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    values.masked_fill_((mass_before >= top_p[:, None]) & (top_p[:, None] < 1) & (rank > 0), float("-inf"))
    # Exact from the candidates: the top-k fits among them and, for top-p, the nucleus closes among them.
    exact = (k <= width) | ((k == vocab) & (top_p < 1) & (probs.sum(dim=-1) >= top_p))
    out = torch.full_like(logits, float("-inf")).scatter_(-1, order, values)
    if not bool(exact.all()):
        rest = (~exact).nonzero()[:, 0]
        out[rest] = _sorted_top_k_top_p(logits[rest], top_k[rest], top_p[rest])
    return out


def _sorted_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    sorted_logits.masked_fill_(rank >= k[:, None], float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Keep a token while the mass before it is below top_p; the most likely one always stays, however small top_p
    # is (a top_p that rounds to 0 in fp32 would otherwise mask every token and sample from NaN).
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    cut = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1) & (rank > 0)
    sorted_logits.masked_fill_(cut, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
