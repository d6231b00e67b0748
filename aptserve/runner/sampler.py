"""Sampler: logits rows -> token ids (and log probabilities where asked), each step's rows processed together.

Order, as vLLM's: structured output's grammar mask first; then the raw log probabilities; then min_tokens (EOS and
stop token ids masked), logit bias, repetition / frequency / presence penalties; greedy rows take the argmax of that;
the others apply temperature, min-p, top-k and top-p and draw. Each step of these is one batched tensor op over the
rows that use it, never a Python loop over vocabulary entries.

Every non-greedy request draws from its own torch.Generator (seeded from SamplingParams.seed, or from the runner
seed and the request id), one uniform per sampled token, and all processing is row-wise: a request's tokens do not
depend on which other requests share its batch.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import NamedTuple

import torch

from aptserve.grammar_compiler import GrammarCompiler
from aptserve.logprobs import LogprobsMode, TokenLogprobs
from aptserve.runner.grammar import GrammarBank
from aptserve.runner.logits_processing import apply_constraints, apply_min_p, apply_top_k_top_p
from aptserve.sampling import SamplingParams
from aptserve.sched.output import ScheduledRequest


class SamplerOutput(NamedTuple):
    token_ids: list[int]  # one per row
    logprobs: dict[str, TokenLogprobs]  # of the rows whose params ask for them
    failed: dict[str, str]  # rows whose structured output cannot go on (request id -> why)


class Sampler:
    def __init__(self, seed: int = 0, device: str | torch.device = "cpu", eos_token_ids: Sequence[int] = (),
                 logprobs_mode: LogprobsMode = LogprobsMode.RAW, grammar_compiler: GrammarCompiler | None = None,
                 vocab_size: int = 0) -> None:
        self.seed = seed
        self.device = torch.device(device)
        self.eos_token_ids = tuple(eos_token_ids)
        self.logprobs_mode = logprobs_mode
        self.grammars = GrammarBank(grammar_compiler, vocab_size)
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_ids: list[str]) -> None:
        """Drop the generators and grammar matchers of finished requests."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)
        self.grammars.forget(request_ids)

    def __call__(self, logits: torch.Tensor, rows: Sequence[ScheduledRequest]) -> SamplerOutput:
        """One token per logits row [N, vocab] (row i is rows[i]'s). Structured output masks first (as vLLM, so raw
        logprobs are those of the allowed tokens)."""
        params = [r.sampling_params for r in rows]
        constrained = []
        if any(p.structured is not None for p in params):
            logits = logits.float().clone()  # a failed batch is re-sampled row by row from the same logits
            constrained = self.grammars.mask(logits, rows)
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw = None
        if logprob_rows and self.logprobs_mode == LogprobsMode.RAW:
            raw = torch.log_softmax(logits[logprob_rows].float(), dim=-1)
        logits = apply_constraints(logits, rows, self.eos_token_ids)
        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            processed = self._process_random(logits[random_rows].float(), [params[i] for i in random_rows])
            if raw is None and logprob_rows:  # processed logprobs: the distribution each row was drawn from
                logits = logits.float().index_copy(0, torch.tensor(random_rows, device=logits.device), processed)
            draws = torch.cat([torch.rand(1, generator=self._generator(rows[i].request_id, params[i]),
                                          device=self.device) for i in random_rows]).to(logits.device)
            token_ids[random_rows] = _inverse_cdf(torch.softmax(processed, dim=-1), draws)
        if raw is None and logprob_rows:
            raw = torch.log_softmax(logits[logprob_rows].float(), dim=-1)
        chosen = token_ids.tolist()
        logprobs = _token_logprobs(raw, [chosen[i] for i in logprob_rows], [params[i] for i in logprob_rows])
        failed = self.grammars.advance(rows, chosen, constrained)
        return SamplerOutput(chosen, {rows[i].request_id: lp for i, lp in zip(logprob_rows, logprobs)}, failed)

    @staticmethod
    def _process_random(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, then min-p, top-k and top-p: the logits each random row is drawn from."""
        temperatures = torch.tensor([p.temperature for p in params], device=logits.device)
        logits = logits / temperatures[:, None]
        if any(p.min_p > 0 for p in params):
            logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], device=logits.device))
        filtered = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1]
        if filtered:
            top_k = torch.tensor([params[i].top_k for i in filtered], device=logits.device)
            top_p = torch.tensor([params[i].top_p for i in filtered], device=logits.device)
            logits[filtered] = apply_top_k_top_p(logits[filtered], top_k, top_p)
        return logits

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        generator = self._generators.get(request_id)
        if generator is None:
            seed = params.seed
            if seed is None:  # crc32, not hash(): stable across processes.
                seed = self.seed * 1_000_003 + zlib.crc32(request_id.encode())
            generator = torch.Generator(self.device).manual_seed(seed)
            self._generators[request_id] = generator
        return generator


def _token_logprobs(logprobs: torch.Tensor | None, chosen: list[int],
                    params: list[SamplingParams]) -> list[TokenLogprobs]:
    """Each row's chosen token (log probability, rank) and its `params.logprobs` most likely tokens."""
    if logprobs is None:
        return []
    chosen_t = torch.tensor(chosen, device=logprobs.device)
    chosen_lp = logprobs.gather(1, chosen_t[:, None])
    ranks = ((logprobs > chosen_lp).sum(dim=1) + 1).tolist()
    k = max(p.logprobs for p in params)
    top_lp, top_ids = logprobs.topk(k, dim=1) if k else (logprobs[:, :0], chosen_t[:, None][:, :0])
    top_lp, top_ids, chosen_lp = top_lp.tolist(), top_ids.tolist(), chosen_lp[:, 0].tolist()
    return [TokenLogprobs(token, lp, rank, ids[:p.logprobs], lps[:p.logprobs])
            for token, lp, rank, ids, lps, p in zip(chosen, chosen_lp, ranks, top_ids, top_lp, params)]


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i]: zero-probability tokens can never be picked."""
    cdf = torch.cumsum(probs, dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)
