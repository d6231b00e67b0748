"""One request's fault fails that request alone: a sampling fault (a crafted params object) and a forward-pass
fault (a token id outside the vocabulary, sent past the door) leave the rest of the batch with the tokens they
get when served alone, on a real (tiny) model, and every cache unit goes back to the pool."""
from __future__ import annotations

import dataclasses

import pytest

from aptserve.core.engine_core import build_engine_core
from aptserve.core.messages import EngineCoreRequest
from aptserve.engine import LLMEngine
from aptserve.engine_args import EngineArgs
from aptserve.sampling import SamplingParams
from tests.model_fixtures import GREEDY, TINY_VOCAB, save_tiny_llama

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20, 21]]
MAX_TOKENS = 12


class BrokenSamplingParams(SamplingParams):
    """Valid at the door; raises inside the sampler, as a value the sampler cannot take would."""

    @property
    def is_greedy(self) -> bool:
        raise OverflowError("crafted sampling fault")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), num_kv_heads=2, tie_word_embeddings=True)


def make_engine(model_path: str, scheduler: str) -> LLMEngine:
    args = EngineArgs(model=model_path, max_model_len=64, block_size=4, kv_cache_memory=8 << 20,
                      hybrid_cache="off", scheduler=scheduler, max_num_seqs=8, alpha=0.0)
    return LLMEngine(build_engine_core(args))  # token ids in and out: no tokenizer


def run(engine: LLMEngine) -> dict[str, tuple[list[int], str | None]]:
    """Step to the end: request id -> (tokens, error)."""
    results = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[output.request_id] = (output.outputs[0].token_ids, output.error)
    return results


def alone(model_path: str, scheduler: str) -> dict[str, list[int]]:
    engine = make_engine(model_path, scheduler)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, dataclasses.replace(GREEDY, max_tokens=MAX_TOKENS), request_id=f"r{i}")
    return {request_id: tokens for request_id, (tokens, _) in run(engine).items()}


def assert_only_it_failed(engine: LLMEngine, expected: dict[str, list[int]], failing_id: str, error_text: str):
    """Run to the end: `failing_id` ends with `error_text` and no token, every other request with the tokens it
    gets alone, and every cache unit is back in the pool."""
    results = run(engine)
    tokens, error = results.pop(failing_id)
    assert tokens == [] and error_text in error
    assert {request_id: tokens for request_id, (tokens, _) in results.items()} == expected
    assert all(error is None for _, error in results.values())
    assert engine.cache.num_free_units == engine.cache.num_units


def queued(model_path: str, scheduler: str) -> tuple[LLMEngine, dict[str, list[int]]]:
    """An engine with PROMPTS queued, and each prompt's tokens when served without a faulty neighbour."""
    expected = alone(model_path, scheduler)
    engine = make_engine(model_path, scheduler)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, dataclasses.replace(GREEDY, max_tokens=MAX_TOKENS), request_id=f"r{i}")
    return engine, expected


@pytest.mark.parametrize("scheduler", ["fcfs", "apt-chunked"])
def test_a_sampling_fault_fails_only_its_request(model_path, scheduler):
    engine, expected = queued(model_path, scheduler)
    engine.add_request([30, 31, 32], BrokenSamplingParams(temperature=0, max_tokens=MAX_TOKENS), request_id="broken")
    assert_only_it_failed(engine, expected, "broken", "crafted sampling fault")


@pytest.mark.parametrize("scheduler", ["fcfs", "apt-chunked"])
def test_a_forward_fault_fails_only_its_request(model_path, scheduler):
    engine, expected = queued(model_path, scheduler)
    params = dataclasses.replace(GREEDY, max_tokens=MAX_TOKENS)
    # Past the door (which refuses ids outside the vocabulary): the embedding lookup fails in the forward pass.
    poisoned = EngineCoreRequest("poisoned", [40, TINY_VOCAB + 7, 41], params, engine.clock.now(), None, None)
    engine.core.add_request(poisoned)
    engine.output_processor.add_request("poisoned", None, poisoned.prompt_token_ids, params, poisoned.arrival_s)
    assert_only_it_failed(engine, expected, "poisoned", "IndexError")
