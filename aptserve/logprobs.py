"""Log probabilities of one generated (or prompt) position, as they cross from the sampler to the API.

Which distribution they come from is the engine's `--logprobs-mode`: the model's raw one (vLLM V1's default), or
the one sampled from after penalties, bias, temperature and top-k / top-p / min-p.
"""
from __future__ import annotations

import enum

import msgspec


class LogprobsMode(enum.Enum):
    RAW = "raw_logprobs"
    PROCESSED = "processed_logprobs"


class TokenLogprobs(msgspec.Struct, array_like=True, frozen=True):
    """The chosen token's log probability and rank (1 = most likely), and the `k` most likely tokens, best first."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []
