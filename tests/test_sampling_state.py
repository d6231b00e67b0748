"""Sampler state that must survive preemption and cache conversions: penalty counts (read from the request's own
tokens) and a structured-output matcher's position (kept by request id). The same seeded requests give the same
tokens on a roomy KV pool and on a tight hybrid pool that preempts and converts them between cache kinds."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from aptserve import SamplingParams
from aptserve.registry import resolve_model
from aptserve.structured_output import StructuredOutput
from tests.test_prefix_caching import MAX_TOKENS, SCRATCH_TOKENS, serve, shared_prompts, tight_budget


@pytest.mark.parametrize("model", ["default", "opt-125m"])
def test_penalties_grammar_and_seeds_survive_preemption_and_conversion(model):
    prompts = shared_prompts(AutoTokenizer.from_pretrained(resolve_model(model)))
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=MAX_TOKENS, frequency_penalty=0.8,
                            presence_penalty=0.4, repetition_penalty=1.2, min_tokens=MAX_TOKENS, logprobs=2,
                            structured=StructuredOutput("regex", "[a-z ]{10,200}"))
    _, roomy = serve(model, prompts, False, params, hybrid_cache="off", scheduler="fcfs",
                     kv_cache_memory=256 << 20)
    tight, squeezed = serve(model, prompts, True, params, hybrid_cache="on", scheduler="apt-chunked",
                            kv_cache_memory=tight_budget(model), max_num_batched_tokens=64,
                            max_model_len=SCRATCH_TOKENS, hidden_scratch_tokens=SCRATCH_TOKENS)
    assert tight.scheduler.num_preemptions > 0 and tight.scheduler.num_conversions > 0
    assert squeezed == roomy
    assert all(len(tokens) == MAX_TOKENS for tokens in roomy)  # min_tokens held EOS back
