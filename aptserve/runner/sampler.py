"""Sampler: logits rows -> token ids; greedy fast path, temperature, top-k, top-p, per-request seeds.

Every non-greedy request draws from its own torch.Generator (seeded from SamplingParams.seed, or from
the runner seed and the request id), one uniform per sampled token, and its row is processed by
row-wise ops only: a request's tokens do not depend on which other requests share its batch.
"""
from __future__ import annotations

import zlib

import torch

from aptserve.sampling import SamplingParams


class Sampler:
    def __init__(self, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.seed = seed
        self.device = torch.device(device)
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_ids: list[str]) -> None:
        """Drop the generators of finished requests."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> list[int]:
        """One token per logits row [N, vocab]; row i belongs to request_ids[i] with params[i]."""
        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            random_ids = [request_ids[i] for i in random_rows]
            token_ids[rows] = self._sample(logits[rows].float(), random_ids, [params[i] for i in random_rows])
        return token_ids.tolist()

    def _sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> torch.Tensor:
        temperatures = torch.tensor([p.temperature for p in params], device=logits.device)
        logits = logits / temperatures[:, None]
        filtered = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1]
        if filtered:
            rows = torch.tensor(filtered, device=logits.device)
            top_k = torch.tensor([params[i].top_k for i in filtered], device=logits.device)
            top_p = torch.tensor([params[i].top_p for i in filtered], device=logits.device)
            logits[rows] = _apply_top_k_top_p(logits[rows], top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        draws = [
            torch.rand(1, generator=self._generator(request_id, p), device=self.device)
            for request_id, p in zip(request_ids, params)
        ]
        return _inverse_cdf(probs, torch.cat(draws).to(logits.device))

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        generator = self._generators.get(request_id)
        if generator is None:
            seed = params.seed
            if seed is None:  # crc32, not hash(): stable across processes.
                seed = self.seed * 1_000_003 + zlib.crc32(request_id.encode())
            generator = torch.Generator(self.device).manual_seed(seed)
            self._generators[request_id] = generator
        return generator


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k (0 = off) and top-p nucleus to -inf."""
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


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i]: zero-probability tokens can never be picked."""
    cdf = torch.cumsum(probs, dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)
