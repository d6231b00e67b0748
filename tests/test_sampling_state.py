"""Sampler state that must survive preemption and cache conversions: penalty counts (read from the request's own
tokens), a structured-output matcher's position (kept by request id) and each request's seeded generator. The same
seeded requests give the same tokens on a roomy KV pool and on a tight hybrid pool that preempts and converts them
between cache kinds, except where a draw lands within float noise of a boundary between two tokens: the two runs
batch and chunk differently, so their fp32 logits differ by ~1e-4 and such a draw may go either way."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from aptserve import SamplingParams
from aptserve.registry import resolve_model
from aptserve.runner import sampler as sampler_module
from aptserve.structured_output import StructuredOutput
from tests.test_prefix_caching import MAX_TOKENS, SCRATCH_TOKENS, serve, shared_prompts, tight_budget

# How far (as a share of the whole distribution) a draw may lie from the boundary between the tokens the two runs
# chose for it to count as a near tie: logits ~1e-4 apart move a boundary by about that much.
NEAR_TIE = 1e-3


def serve_recording_draws(*args, **kwargs):
    """`serve(*args, **kwargs)` and every random draw its sampler made, by (request id, the request's n-th draw):
    (probabilities, uniform)."""
    draws: dict[tuple[str, int], tuple[torch.Tensor, float]] = {}
    num_draws: Counter[str] = Counter()
    rows: list[str] = []
    sample, inverse_cdf = sampler_module.Sampler.__call__, sampler_module._inverse_cdf

    def recording_call(sampler, logits, scheduled):
        rows[:] = [row.request_id for row in scheduled]
        return sample(sampler, logits, scheduled)

    def recording_inverse_cdf(probs, uniforms):
        assert len(rows) == probs.shape[0], "every row of these requests is sampled at random"
        for request_id, row_probs, uniform in zip(rows, probs, uniforms.tolist()):
            draws[request_id, num_draws[request_id]] = (row_probs.clone(), uniform)
            num_draws[request_id] += 1
        return inverse_cdf(probs, uniforms)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampler_module.Sampler, "__call__", recording_call)
        patch.setattr(sampler_module, "_inverse_cdf", recording_inverse_cdf)
        return serve(*args, **kwargs), draws


def near_tie(probs: torch.Tensor, uniform: float, token: int, other: int) -> bool:
    """Whether `uniform` falls within NEAR_TIE of the boundary between `token` and `other` in the inverse-CDF order
    (tokens between them, if any, have no probability: masked by the grammar)."""
    cdf = torch.cumsum(probs.double(), dim=0)
    target, low, high = uniform * cdf[-1].item(), min(token, other), max(token, other)
    return abs(target - cdf[low].item()) <= NEAR_TIE and cdf[high - 1].item() - cdf[low].item() <= NEAR_TIE


@pytest.mark.parametrize("model", ["default", "opt-125m"])
def test_penalties_grammar_and_seeds_survive_preemption_and_conversion(model):
    prompts = shared_prompts(AutoTokenizer.from_pretrained(resolve_model(model)))
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=MAX_TOKENS, frequency_penalty=0.8,
                            presence_penalty=0.4, repetition_penalty=1.2, min_tokens=MAX_TOKENS, logprobs=2,
                            structured=StructuredOutput("regex", "[a-z ]{10,200}"))
    (_, roomy), roomy_draws = serve_recording_draws(model, prompts, False, params, hybrid_cache="off",
                                                    scheduler="fcfs", kv_cache_memory=256 << 20)
    tight, squeezed = serve(model, prompts, True, params, hybrid_cache="on", scheduler="apt-chunked",
                            kv_cache_memory=tight_budget(model), max_num_batched_tokens=64,
                            max_model_len=SCRATCH_TOKENS, hidden_scratch_tokens=SCRATCH_TOKENS)
    # The requested KV -> HIDDEN conversions re-prefill on GQA (default) and are solved back in place on MHA.
    assert tight.scheduler.num_conversions > 0 and (tight.scheduler.num_preemptions > 0 or model == "opt-125m")
    assert all(len(tokens) == MAX_TOKENS for tokens in roomy)  # min_tokens held EOS back
    assert len(squeezed) == len(roomy)
    for index, (expected, got) in enumerate(zip(roomy, squeezed)):
        if got == expected:
            continue
        # Past the first difference the two requests continue different texts; that draw must have been a tie.
        at = next(i for i, (a, b) in enumerate(zip(expected, got)) if a != b)
        probs, uniform = roomy_draws[str(index), at]
        assert near_tie(probs, uniform, expected[at], got[at]), (
            f"request {index} chose {got[at]} instead of {expected[at]} at output token {at}, and the draw was no tie")
