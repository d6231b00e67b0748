"""ModelRunner against HF transformers (identical greedy tokens, close fp32 logits), sampler, registry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aptserve.cache import CacheKind, CacheManager
from aptserve.errors import UnknownModelError
from aptserve.registry import KNOWN_MODELS, load_model_config, load_tokenizer, resolve_model
from aptserve.cache.geometry import bytes_per_unit
from aptserve.runner import ModelRunner
from aptserve.runner.sampler import Sampler
from aptserve.sampling import SamplingParams
from aptserve.sched.output import ScheduledRequest, SchedulerOutput
from tests.model_fixtures import (
    GREEDY, TINY_VOCAB, Driver, DriverRequest, assert_matches_hf_greedy, save_tiny_llama, save_tiny_opt,
)

TINY_MODELS = {
    "llama-mha": lambda path: save_tiny_llama(path, num_kv_heads=4, tie_word_embeddings=False),
    "llama-gqa": lambda path: save_tiny_llama(path, num_kv_heads=2, tie_word_embeddings=True),
    "opt-pre-ln": lambda path: save_tiny_opt(path, do_layer_norm_before=True, word_embed_proj_dim=64),
    "opt-post-ln-proj": lambda path: save_tiny_opt(path, do_layer_norm_before=False, word_embed_proj_dim=32),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny GEMMs gain nothing from threads, and on a busy 2-core box a second OpenMP thread stalls."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def tiny_model(request, tmp_path_factory):
    """(folder, HF reference model in fp32) for each tiny architecture variant."""
    from transformers import AutoModelForCausalLM

    path = TINY_MODELS[request.param](tmp_path_factory.mktemp(request.param))
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_runner(path: str, num_units: int = 256, block_size: int = 4, dtype: str = "float32"):
    runner = ModelRunner(load_model_config(path), num_units, block_size, dtype, "cpu", seed=0)
    return runner, CacheManager(num_units, block_size)


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY_VOCAB, (n,), generator=generator).tolist() for n in lengths]


def forward_all_logits(runner: ModelRunner, scheduled: list[ScheduledRequest]) -> torch.Tensor:
    """Logits of every row of one step, in the runner's order (decodes first, then prefill chunks)."""
    model_input = runner.prepare_inputs(scheduled)
    with torch.inference_mode():
        hidden = runner.model(model_input.input_ids, model_input.positions, model_input.attn_metadata)
        return runner.model.compute_logits(hidden)


@pytest.mark.parametrize("decode_group_bytes", [None, 4096], ids=["one-group", "small-groups"])
def test_batched_prefill_then_decodes_match_hf(tiny_model, decode_group_bytes):
    path, hf_model = tiny_model
    runner, manager = make_runner(path)
    if decode_group_bytes:  # A few decodes per attention group (2 KiB per block of 4 rows here).
        runner.decode_group_bytes = decode_group_bytes
    prompts = random_prompts([5, 17, 1, 9])
    requests = [DriverRequest(f"r{i}", p, max_new_tokens=10) for i, p in enumerate(prompts)]
    outputs = Driver(runner, manager).run(requests)
    for request, prompt in zip(requests, prompts):
        assert_matches_hf_greedy(hf_model, prompt, outputs[request.request_id])
    assert manager.num_free_units == manager.num_units


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_chunked_prefill_mixed_with_decodes_matches_hf(tiny_model, block_size):
    path, hf_model = tiny_model
    runner, manager = make_runner(path, block_size=block_size)
    prompts = random_prompts([6, 23, 11], seed=1)
    # r0 decodes while r1 and r2 arrive later and prefill in chunks of 8 (3 and 2 chunks).
    requests = [
        DriverRequest("r0", prompts[0], max_new_tokens=12),
        DriverRequest("r1", prompts[1], max_new_tokens=8, arrival_step=2),
        DriverRequest("r2", prompts[2], max_new_tokens=8, arrival_step=3),
    ]
    outputs = Driver(runner, manager, chunk_size=8).run(requests)
    for request, prompt in zip(requests, prompts):
        assert_matches_hf_greedy(hf_model, prompt, outputs[request.request_id])


def test_logits_match_hf_for_a_chunk_after_cached_rows_and_a_decode(tiny_model):
    path, hf_model = tiny_model
    runner, manager = make_runner(path)
    prompt_a, prompt_b = random_prompts([20, 7], seed=2)
    driver = Driver(runner, manager, chunk_size=8)
    requests = [DriverRequest("a", prompt_a, 4), DriverRequest("b", prompt_b, 4)]
    driver.step(requests)  # a: rows [0, 8); b: its whole prompt, sampled
    logits = forward_all_logits(runner, driver.schedule(requests))  # b decodes (row 0); a: rows [8, 16)
    with torch.no_grad():
        ref_b = hf_model(torch.tensor([requests[1].all_tokens])).logits[0, -1]
        ref_a = hf_model(torch.tensor([prompt_a[:16]])).logits[0, 8:16]
    torch.testing.assert_close(logits[0], ref_b, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1:], ref_a, atol=2e-5, rtol=1e-4)


def test_prefill_logits_match_hf_on_every_row(tiny_model):
    path, hf_model = tiny_model
    runner, manager = make_runner(path)
    (prompt,) = random_prompts([19], seed=3)
    logits = forward_all_logits(runner, Driver(runner, manager).schedule([DriverRequest("p", prompt, 1)]))
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-4)


# --- the real default model (SmolLM2-135M-Instruct) ---------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    path = resolve_model("default")
    return path, load_tokenizer(path)


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_smollm2_greedy_matches_hf_with_chunks(smollm2):
    from transformers import AutoModelForCausalLM

    path, tokenizer = smollm2
    questions = ("What is the capital of France?", "Name three colours.", "Hi")
    prompts = [chat_ids(tokenizer, text) for text in questions]
    prompts.append(list(range(100, 170)))  # a long raw prompt, prefilled in chunks across steps
    runner, manager = make_runner(path, num_units=128, block_size=16)
    requests = [DriverRequest(f"s{i}", p, max_new_tokens=8, arrival_step=i) for i, p in enumerate(prompts)]
    outputs = Driver(runner, manager, chunk_size=32).run(requests)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for request, prompt in zip(requests, prompts):
        assert_matches_hf_greedy(hf_model, prompt, outputs[request.request_id])
    assert "Paris" in tokenizer.decode(outputs["s0"])


def test_smollm2_bfloat16_answers(smollm2):
    path, tokenizer = smollm2
    runner, manager = make_runner(path, num_units=16, block_size=16, dtype="bfloat16")
    assert runner.kv_cache.dtype == torch.bfloat16
    request = DriverRequest("q", chat_ids(tokenizer, "What is the capital of France?"), max_new_tokens=7)
    outputs = Driver(runner, manager).run([request])
    assert "Paris" in tokenizer.decode(outputs["q"])


def test_smollm2_config_and_bytes_per_unit(smollm2):
    config = load_model_config(smollm2[0])
    geometry = (config.num_layers, config.hidden_size, config.num_kv_heads, config.head_dim)
    assert geometry == (30, 576, 3, 64) and config.vocab_size == 49152
    assert config.eos_token_ids == (2,) and config.max_model_len == 8192
    assert bytes_per_unit(config, 16, "float32") == 30 * 16 * 3 * 64 * 4
    assert bytes_per_unit(config, 16, "bfloat16") == 30 * 16 * 3 * 64 * 2


# --- sampler ------------------------------------------------------------------------------------------
def sampled_rows(request_ids, params, outputs=None) -> list[ScheduledRequest]:
    """The sampler's rows: one decode per request (`outputs`: each one's output tokens so far)."""
    outputs = outputs or [[] for _ in request_ids]
    return [ScheduledRequest(request_id, [0], 0, CacheKind.KV, [], True, p, [], out)
            for request_id, p, out in zip(request_ids, params, outputs)]


def sample_rounds(sampler: Sampler, logits: torch.Tensor, request_ids, params, rounds: int) -> list[list[int]]:
    return [sampler(logits, sampled_rows(request_ids, params))[0] for _ in range(rounds)]


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7)
    others = [SamplingParams(temperature=1.0), GREEDY]
    alone = sample_rounds(Sampler(), logits[:1], ["x"], [seeded], rounds=20)
    in_batch = sample_rounds(Sampler(), logits, ["x", "y", "z"], [seeded, *others], rounds=20)
    assert [tokens[0] for tokens in in_batch] == [tokens[0] for tokens in alone]
    assert len({tokens[0] for tokens in alone}) > 1  # it really samples


def test_unseeded_requests_follow_runner_seed_and_forget_restarts():
    logits = torch.zeros(1, 1000)  # uniform: any token may come
    params = [SamplingParams(temperature=1.0)]
    first = sample_rounds(Sampler(seed=3), logits, ["r"], params, rounds=10)
    assert sample_rounds(Sampler(seed=3), logits, ["r"], params, rounds=10) == first
    assert sample_rounds(Sampler(seed=4), logits, ["r"], params, rounds=10) != first
    sampler = Sampler(seed=3)
    sample_rounds(sampler, logits, ["r"], params, rounds=4)
    sampler.forget(["r"])
    assert sample_rounds(sampler, logits, ["r"], params, rounds=10) == first


def test_top_k_one_tiny_top_p_and_tiny_temperature_equal_greedy():
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(1))
    greedy = logits.argmax(-1).tolist()
    request_ids = [f"r{i}" for i in range(8)]
    # top_p below fp32's smallest value and temperatures below 1e-5 (greedy, as vLLM) must not sample from NaN.
    for params in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6),
                   SamplingParams(temperature=1.5, top_p=1e-300), SamplingParams(temperature=1e-308)):
        for tokens in sample_rounds(Sampler(), logits, request_ids, [params] * 8, rounds=5):
            assert tokens == greedy


def test_sampling_follows_probabilities_within_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.05, 0.25], [0.1, 0.6, 0.05, 0.25]]))
    params = [SamplingParams(temperature=1.0, top_k=2, seed=0), SamplingParams(top_p=0.8, seed=1)]
    rounds = sample_rounds(Sampler(), logits, ["k", "p"], params, rounds=2000)
    for column in (0, 1):  # both keep {1: 0.6, 3: 0.25} only: top-2, and the smallest set with mass >= 0.8
        tokens = [r[column] for r in rounds]
        assert set(tokens) == {1, 3}
        assert abs(tokens.count(1) / len(tokens) - 0.6 / 0.85) < 0.04


# --- registry -----------------------------------------------------------------------------------------
def test_unknown_model_names_the_choices(tmp_path):
    with pytest.raises(UnknownModelError) as excinfo:
        resolve_model("gpt-17")
    message = str(excinfo.value)
    assert all(name in message for name in KNOWN_MODELS) and "local" in message
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnknownModelError, match="gpt2"):
        resolve_model(str(tmp_path))


def test_model_config_limits_and_eos(tmp_path):
    path = save_tiny_llama(tmp_path, num_kv_heads=2, tie_word_embeddings=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert resolve_model(path) == path
    config = load_model_config(path, max_model_len=100, served_name="tiny")
    assert (config.max_model_len, config.num_kv_heads, config.head_dim) == (100, 2, 16)
    assert (config.eos_token_ids, config.served_name) == ((5, 7), "tiny")
    assert load_model_config(path).max_model_len == 256
    with pytest.raises(ValueError, match="max_position_embeddings"):
        load_model_config(path, max_model_len=257)


def test_opt_125m_has_the_published_shape_and_runs():
    config = load_model_config(resolve_model("opt-125m"))
    assert (config.architecture, config.num_layers, config.hidden_size) == ("opt", 12, 768)
    # Other servers (vLLM) choose the model class from `architectures`, not model_type.
    assert json.loads((Path(config.path) / "config.json").read_text())["architectures"] == ["OPTForCausalLM"]
    assert config.hidden_kv_ratio == 0.5
    runner, manager = make_runner(config.path, num_units=8, block_size=16)
    manager.allocate("o", CacheKind.KV, 5)
    scheduled = ScheduledRequest("o", [1, 2, 3, 4, 5], 0, CacheKind.KV, manager.unit_ids("o"), True, GREEDY)
    tokens = runner.execute(SchedulerOutput(0, [scheduled])).sampled_token_ids
    assert list(tokens) == ["o"] and 0 <= tokens["o"] < config.vocab_size
