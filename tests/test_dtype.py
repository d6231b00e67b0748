"""--dtype auto as vLLM resolves it, --kv-cache-dtype, and how close bf16 stays to float32.

The accuracy figures the README states come from benchmarks/dtype_accuracy.py (16 held-back ShareGPT prompts); the
checks here run a smaller set of other prompts against bounds with room for machines whose bf16 GEMMs round
differently (native avx512_bf16 vs emulated)."""
from __future__ import annotations

import dataclasses

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from aptserve import LLM, SamplingParams, hardware
from aptserve.config import ModelConfig
from aptserve.engine_args import EngineArgs, resolve
from aptserve.registry import resolve_model
from tests.test_server import running_server

REAL_CPU_COMPUTES_BF16 = hardware.cpu_computes_bf16  # before the suite's float32 pin replaces it
MODEL = ModelConfig(path="sim", architecture="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                    head_dim=16, vocab_size=1000, max_model_len=256)


def resolved(checkpoint_dtype: str = "float32", **flags):
    model = dataclasses.replace(MODEL, checkpoint_dtype=checkpoint_dtype)
    return resolve(EngineArgs(model="sim", kv_cache_memory=1 << 20, hybrid_cache="off", **flags), model)


def test_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_computes_bf16", lambda: True)
    for checkpoint in ("float32", "bfloat16", "float16"):  # float32 downcast and float16 as bf16, as vLLM on CPU
        config = resolved(checkpoint)
        assert (config.dtype, config.cache.dtype) == ("bfloat16", "bfloat16")
    monkeypatch.setattr(hardware, "cpu_computes_bf16", lambda: False)
    for checkpoint in ("float32", "bfloat16", "float16"):
        config = resolved(checkpoint)
        assert (config.dtype, config.cache.dtype) == ("float32", "float32")


def test_the_flags_read_the_cpu(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_computes_bf16", REAL_CPU_COMPUTES_BF16)
    for flags, native in (({"avx2", "fma"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True),
                          ({"fp", "asimd", "bf16"}, True)):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert hardware.cpu_computes_bf16() is native


def test_explicit_dtypes_aliases_and_the_cache_dtype():
    assert resolved(dtype="half").dtype == "float16" and resolved(dtype="float").dtype == "float32"
    fp32, bf16_cache = resolved(dtype="float32"), resolved(dtype="float32", kv_cache_dtype="bfloat16")
    assert (bf16_cache.dtype, bf16_cache.cache.dtype) == ("float32", "bfloat16")
    assert bf16_cache.cache.num_units == 2 * fp32.cache.num_units  # the same bytes hold twice the tokens
    assert resolved(dtype="bfloat16").cache.num_units == bf16_cache.cache.num_units
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        resolved(dtype="int8")
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto or one of"):
        resolved(kv_cache_dtype="fp8")


def test_the_server_shows_the_resolved_dtypes():
    llm = LLM(model="default", kv_cache_memory=32 << 20, kv_cache_dtype="bfloat16")
    with running_server(llm.engine) as live:
        metrics = httpx.get(f"{live.base_url}/metrics").text
    line = next(line for line in metrics.splitlines() if line.startswith("aptserve:engine_config_info{"))
    assert 'dtype="float32"' in line and 'kv_cache_dtype="bfloat16"' in line


# --- accuracy -------------------------------------------------------------------------------------
PROMPTS = ["Write a haiku about the sea.", "What is the boiling point of water at sea level?",
           "Explain recursion to a child in two sentences.", "List three prime numbers greater than 50.",
           "Translate 'good morning' into French.", "Why is the sky blue?"]
NUM_TOKENS = 16


@pytest.fixture(scope="module")
def reference():
    """Chat prompts and HF float32's greedy continuations of them."""
    path = resolve_model("default")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(model="default", dtype="float32", kv_cache_memory=64 << 20)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for p in PROMPTS]
    with torch.inference_mode():
        continuations = [model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NUM_TOKENS,
                                        min_new_tokens=NUM_TOKENS, pad_token_id=0)[0, len(p):].tolist()
                         for p in prompts]
    return path, prompts, continuations, scored(llm, prompts, continuations)


def scored(llm: LLM, prompts, continuations) -> list[tuple[float, bool]]:
    """Each continuation token's log probability, and whether it is the most likely one (teacher forcing)."""
    outputs = llm.generate([p + c for p, c in zip(prompts, continuations)],
                           SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [(o.prompt_logprobs[len(p) - 1 + i].logprob, o.prompt_logprobs[len(p) - 1 + i].rank == 1)
            for p, c, o in zip(prompts, continuations, outputs) for i in range(len(c))]


def agreement(a, b) -> tuple[float, float]:
    """(top-1 agreement, max |logprob difference|) of two scorings of the same tokens."""
    return (sum(x[1] == y[1] for x, y in zip(a, b)) / len(a), max(abs(x[0] - y[0]) for x, y in zip(a, b)))


@pytest.mark.slow
def test_bf16_stays_close_to_float32_and_to_hf_bf16(reference):
    path, prompts, continuations, fp32 = reference
    bf16 = scored(LLM(model="default", dtype="bfloat16", kv_cache_memory=64 << 20), prompts, continuations)
    top1, max_diff = agreement(bf16, fp32)
    assert top1 >= 0.9 and max_diff < 0.5, (top1, max_diff)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        hf_bf16 = []
        for p, c in zip(prompts, continuations):
            logprobs = torch.log_softmax(hf(torch.tensor([p + c])).logits[0].float(), -1)[len(p) - 1:-1]
            hf_bf16 += [(logprobs[i, t].item(), logprobs[i].argmax().item() == t) for i, t in enumerate(c)]
    top1, max_diff = agreement(bf16, hf_bf16)
    assert top1 >= 0.9 and max_diff < 0.5, (top1, max_diff)


def test_a_bf16_cache_under_float32_weights_barely_moves_the_logprobs(reference):
    _, prompts, continuations, fp32 = reference
    for hybrid_cache in ("off", "all-hidden"):  # K/V rows, and hidden rows re-projected from bf16
        llm = LLM(model="default", dtype="float32", kv_cache_dtype="bfloat16", hybrid_cache=hybrid_cache,
                  kv_cache_memory=64 << 20)
        top1, max_diff = agreement(scored(llm, prompts, continuations), fp32)
        assert top1 >= 0.97 and max_diff < 0.1, (hybrid_cache, top1, max_diff)
        assert llm.engine.cache.num_free_units == llm.engine.cache.num_units
