"""How long a step will take, from what it holds: fitted online from the engine's own steps.

A step's time is close to linear in four things: a fixed part (launching it, streaming the weights at small
batch), the rows it feeds (decode tokens and prompt tokens: the GEMMs), the attention work (each fed token's
context: the K/V it reads) and the prompt tokens it scores for their logprobs (a vocabulary-wide head row, softmax
and top-k each). The engine core records every step it runs and refits the four coefficients by least squares over
a window of recent steps, so the estimate follows this machine, this model and its load. A fourth
part, re-projecting K/V from hidden rows, is known rather than fitted: alpha (seconds per block, measured at
start-up) per block of hidden context; the fit sees each step's time less that part. The scheduler only evaluates
the model: it stays pure (no clock, no tensors).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class StepCostModel:
    """seconds = base_s + per_token_s * tokens fed + per_attention_s * attention work (context tokens read)
    + per_scored_token_s * prompt tokens scored for their logprobs
    + per_recompute_token_s * context tokens whose K/V are re-projected from hidden rows (alpha / block size).
    Prompt chunks are sized within target / chunk_margin: how much slower than predicted the recent chunk steps ran
    (at least 1), the part of a linear fit's error that lands on the steps a stream waits through."""

    base_s: float = 0.01
    per_token_s: float = 0.001
    per_attention_s: float = 1e-7
    per_recompute_token_s: float = 0.0
    per_scored_token_s: float = 0.0
    chunk_margin: float = 1.0

    def predict(self, num_tokens: int, attention_work: float, recompute_tokens: int = 0,
                scored_tokens: int = 0) -> float:
        return (self.base_s + self.per_token_s * num_tokens + self.per_attention_s * attention_work
                + self.per_recompute_token_s * recompute_tokens + self.per_scored_token_s * scored_tokens)

    def max_extra_tokens(self, target_s: float, num_tokens: int, attention_work: float, context_len: int,
                         recompute_tokens: int = 0, scored_tokens: int = 0, scored_chunk: bool = False) -> int:
        """Prompt tokens that can join a step already holding `num_tokens`, `attention_work`, `recompute_tokens`
        and `scored_tokens` while it stays within `target_s`, for a chunk that starts after `context_len` cached
        tokens (and is scored itself if `scored_chunk`)."""
        spare_s = target_s / self.chunk_margin - self.predict(num_tokens, attention_work, recompute_tokens,
                                                              scored_tokens)
        if spare_s <= 0:
            return 0
        # n tokens cost n * per_token + per_attention * attention_work(context_len, n): the quadratic in n.
        per_token_s = self.per_token_s + (self.per_scored_token_s if scored_chunk else 0.0)
        a, b = self.per_attention_s / 2, per_token_s + self.per_attention_s * (context_len + 0.5)
        if a <= 0:
            return int(spare_s / b) if b > 0 else 1 << 30
        return int((-b + (b * b + 4 * a * spare_s) ** 0.5) / (2 * a))


def attention_work(start_pos: int, num_tokens: int) -> float:
    """Context tokens read by `num_tokens` fed tokens starting at `start_pos` (causal: each reads those before)."""
    return num_tokens * (start_pos + (num_tokens + 1) / 2)


# A fit is anchored to the model it replaces on a side its window does not show: no decode-sized step (at most
# SMALL_STEP_TOKENS fed), or no prompt chunk (more): a row priced by that model at a decode of a 256-token context,
# or at a 256-token chunk, with a weight small enough that it only settles what the window leaves open. Else a
# stretch of decodes alone (tokens, context and the fixed part collinear) would throw the chunk estimate anywhere.
SMALL_STEP_TOKENS = 64
DECODE_ANCHOR, CHUNK_ANCHOR = (1, 256.0), (256, attention_work(0, 256))
ANCHOR_WEIGHT = 0.01
# A step this many times slower than predicted makes the fitter refit at once, so a model that underestimates prompt
# chunks (a fresh server's prior) is corrected by the first chunk it got wrong; so does the first step that scores
# prompt tokens while their price is still unknown (0).
SURPRISE_FACTOR = 1.5
# chunk_margin: an exponential average of the chunk steps' time over their prediction, with this weight on the
# newest, kept within [1, MAX_CHUNK_MARGIN] (a step slowed by something else for once must not halve the chunks).
CHUNK_MARGIN_WEIGHT = 0.5
MAX_CHUNK_MARGIN = 1.5


class StepCostFitter:
    """Least squares over the last `window` steps (and the anchors it lacks); refits every `refit_every` steps once
    it has `min_steps`, and at once after a step that took SURPRISE_FACTOR times its prediction."""

    def __init__(self, prior: StepCostModel | None = None, window: int = 512, refit_every: int = 8,
                 min_steps: int = 16) -> None:
        self.model = prior or StepCostModel()
        self.window, self.refit_every, self.min_steps = window, refit_every, min_steps
        self._ring = np.zeros((window, 4))  # (tokens, work, seconds, scored tokens), the oldest overwritten
        self._num_rows = self._num_since_fit = 0
        self._chunk_ratio = 1.0
        self.fitted = False  # until the first refit, the model is the prior, not this machine's

    def observe(self, num_tokens: int, work: float, seconds: float, recompute_tokens: int = 0,
                scored_tokens: int = 0) -> None:
        seconds -= self.model.per_recompute_token_s * recompute_tokens
        self._ring[self._num_rows % self.window] = (num_tokens, work, seconds, scored_tokens)
        self._num_rows += 1
        self._num_since_fit += 1
        predicted_s = self.model.predict(num_tokens, work, scored_tokens=scored_tokens)
        surprised = seconds > SURPRISE_FACTOR * predicted_s
        unpriced = scored_tokens > 0 and self.model.per_scored_token_s == 0  # the first scored step it sees
        if (self._num_since_fit >= self.refit_every or surprised or unpriced) and self._num_rows >= self.min_steps:
            self.refit()
            # the margin is taken against the model now in use (a refit on this very step leaves little to correct)
            predicted_s = self.model.predict(num_tokens, work, scored_tokens=scored_tokens)
        if num_tokens > SMALL_STEP_TOKENS and predicted_s > 0:
            self._chunk_ratio += CHUNK_MARGIN_WEIGHT * (seconds / predicted_s - self._chunk_ratio)
            self.model = replace(self.model, chunk_margin=min(MAX_CHUNK_MARGIN, max(1.0, self._chunk_ratio)))

    @property
    def rows(self) -> np.ndarray:
        """The steps in the window: (tokens, work, seconds less the known recompute, scored tokens) each."""
        return self._ring[:min(self._num_rows, self.window)]

    def forget_chunk_margin(self) -> None:
        """Start the margin afresh (after a warm-up whose chunks were planned by the prior, not by the fit)."""
        self._chunk_ratio = 1.0
        self.model = replace(self.model, chunk_margin=1.0)

    def refit(self) -> None:
        """Fit the model on the steps seen so far (and the anchors they lack) now."""
        rows = self.rows
        if len(rows):
            self._num_since_fit = 0
            self.fitted = True
            smallest, largest = float(rows[:, 0].min()), float(rows[:, 0].max())
            missing = [DECODE_ANCHOR] * (smallest > SMALL_STEP_TOKENS) + [CHUNK_ANCHOR] * (largest <= SMALL_STEP_TOKENS)
            anchors = [(t, w, self.model.predict(t, w), 0) for t, w in missing]
            data = np.vstack([rows, anchors]) if anchors else rows
            self.model = fit(data, self.model, [1.0] * len(rows) + [ANCHOR_WEIGHT] * len(anchors))


def fit(rows: Sequence[tuple[float, ...]], fallback: StepCostModel,
        weights: Sequence[float] | None = None) -> StepCostModel:
    """Non-negative least squares of seconds on (1, tokens, attention work, scored tokens), each row's error times
    its weight (default 1); rows are (tokens, work, seconds[, scored tokens]). `fallback` if the data cannot say
    (its recompute price is kept either way)."""
    data = np.asarray(rows, dtype=float)
    if data.shape[1] == 3:
        data = np.column_stack([data, np.zeros(len(data))])
    scale = np.ones(len(data)) if weights is None else np.asarray(weights, dtype=float)
    features = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1], data[:, 3]])
    coef = nonnegative_least_squares(features * scale[:, None], data[:, 2] * scale)
    if coef is None:
        return fallback
    base_s, per_token_s, per_attention_s, per_scored_token_s = map(float, coef)
    return replace(fallback, base_s=base_s, per_token_s=per_token_s, per_attention_s=per_attention_s,
                   per_scored_token_s=per_scored_token_s)


def nonnegative_least_squares(features: np.ndarray, targets: np.ndarray) -> np.ndarray | None:
    """Coefficients >= 0 minimising |features @ coef - targets| (a small active-set NNLS: drop the most negative
    coefficient and refit the rest); None if no column can stay."""
    scale = np.maximum(np.abs(features).max(axis=0), 1e-12)  # columns of very different magnitudes
    active = list(range(features.shape[1]))
    while active:
        solved, *_ = np.linalg.lstsq(features[:, active] / scale[active], targets, rcond=None)
        if np.all(solved >= 0):
            coef = np.zeros(features.shape[1])
            coef[active] = solved / scale[active]
            return coef
        active.pop(int(np.argmin(solved)))
    return None
