"""Our CPU kernels and the plain paths they replace: the paged decode kernel against SDPA over gathered K/V, the
prefill kernel against exact attention, the RMSNorm kernel against torch's, and the whole runner with no kernel nor
packed weights still matching HF token for token."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aptserve.hardware import cpu_flags
from aptserve.model import attention, linear, rms_norm
from aptserve.model.cpu_kernels import DISABLE_ENV, cpu_kernels
from aptserve.runner import model_runner
from tests.model_fixtures import Driver, DriverRequest, assert_matches_hf_greedy, save_tiny_llama
from tests.test_model_runner import make_runner, random_prompts

kernels = cpu_kernels()
needs_kernels = pytest.mark.skipif(kernels is None, reason="the CPU kernels did not build on this machine")


@needs_kernels
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (4, 4, 64), (6, 2, 32), (4, 2, 128), (3, 1, 20)])
def test_paged_decode_kernel_matches_sdpa_over_gathered_kv(num_heads, num_kv_heads, head_dim, cache_dtype):
    """Head sizes of whole vectors (the vectorised blocks) and one that is not (20: the plain loops); bf16 rows are
    widened exactly, so they match SDPA over the same rows in fp32 as closely as fp32 rows do."""
    generator = torch.Generator().manual_seed(num_heads)
    block_size, num_requests = 16, 7
    context_lens = torch.tensor([1, 15, 16, 17, 100, 250, 33])
    num_blocks = (context_lens + block_size - 1) // block_size
    max_blocks = int(num_blocks.max())
    cache = torch.randn(2 * int(num_blocks.sum()) + 4, block_size, num_kv_heads * head_dim,
                        generator=generator).to(cache_dtype)
    order = torch.randperm(cache.shape[0], generator=generator)
    k_units = torch.zeros(num_requests, max_blocks, dtype=torch.long)
    v_units = torch.zeros_like(k_units)
    used = 0
    for b, n in enumerate(num_blocks.tolist()):
        k_units[b, :n], v_units[b, :n] = order[used:used + 2 * n:2], order[used + 1:used + 2 * n:2]
        used += 2 * n
    q = torch.randn(num_requests, num_heads, head_dim, generator=generator)
    out = torch.empty_like(q)
    kernels.paged_decode_attention(out, q, cache, k_units, v_units, context_lens, head_dim**-0.5, num_kv_heads)
    cache = cache.float()
    for b, length in enumerate(context_lens.tolist()):
        k = cache[k_units[b]].reshape(-1, num_kv_heads, head_dim)[:length].transpose(0, 1)
        v = cache[v_units[b]].reshape(-1, num_kv_heads, head_dim)[:length].transpose(0, 1)
        expected = F.scaled_dot_product_attention(q[b][:, None], k, v, enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_the_prefill_kernel_is_built_for_the_dtypes_this_cpu_computes():
    """bf16 where the CPU has AVX-512 BF16; elsewhere none (torch's SDPA runs)."""
    expected = {"bfloat16"} if "avx512_bf16" in cpu_flags() else set()
    assert set(kernels.prefill_attention_dtypes()) == expected
    assert attention.prefill_kernel_dtypes() == {getattr(torch, name) for name in expected}


@pytest.mark.skipif(kernels is None or not kernels.prefill_attention_dtypes(), reason="needs AVX-512 BF16")
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
@pytest.mark.parametrize("num_queries, offset", [(1, 0), (5, 0), (37, 0), (100, 300), (260, 0), (16, 17)])
def test_bf16_prefill_kernel_is_as_close_to_exact_attention_as_torchs_sdpa(num_heads, num_kv_heads, head_dim,
                                                                          num_queries, offset):
    """Causal over the context and the chunk (queries at offset ..), tiles cut mid-block, GQA and MHA; its error
    against attention in float64 over the same bf16 inputs is that of torch's own bf16 SDPA."""
    generator = torch.Generator().manual_seed(num_queries + offset)
    num_keys = offset + num_queries
    q = torch.randn(num_queries, num_heads, head_dim, generator=generator).bfloat16()
    k, v = (torch.randn(num_keys, num_kv_heads, head_dim, generator=generator).to(q.dtype) for _ in range(2))
    out = torch.full_like(q, float("nan"))
    kernels.prefill_attention(out, q, k, v, offset, head_dim**-0.5)
    mask = torch.ones(num_queries, num_keys, dtype=torch.bool).tril_(offset)
    heads_first = [t.transpose(0, 1)[None] for t in (q, k, v)]
    exact = F.scaled_dot_product_attention(*[t.double() for t in heads_first], attn_mask=mask, enable_gqa=True)
    torch_sdpa = F.scaled_dot_product_attention(*heads_first, attn_mask=mask, enable_gqa=True)
    exact = exact[0].transpose(0, 1)
    ours_error = (out.double() - exact).abs().max().item()
    torch_error = (torch_sdpa[0].transpose(0, 1).double() - exact).abs().max().item()
    assert ours_error <= 1.5 * torch_error + 2e-3, (ours_error, torch_error)
    with pytest.raises(RuntimeError, match="keys"):
        kernels.prefill_attention(out, q, k[1:], v[1:], offset, head_dim**-0.5)


@needs_kernels
@pytest.mark.parametrize("rows, hidden", [(1, 576), (8, 576), (3, 20), (512, 576), (700, 768)])
def test_rms_norm_kernel_matches_torch(rows, hidden):
    """A decode step's few rows, a width that is not whole vectors, and chunks split over threads."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden, generator=generator) * 3 + 0.5
    weight = torch.randn(hidden, generator=generator)
    out = torch.full_like(x, float("nan"))
    kernels.rms_norm(out, x, weight, 1e-5)
    torch.testing.assert_close(out, F.rms_norm(x, (hidden,), weight, 1e-5), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.rms_norm(out[:, :hidden // 2].contiguous(), x[:, ::2], weight[:hidden // 2], 1e-5)


@needs_kernels
def test_the_model_norms_use_the_kernel_and_take_strided_rows():
    norm = rms_norm.RMSNorm(64, 1e-6)
    norm.weight.data = torch.randn(64)
    assert rms_norm.use_rms_norm_kernel(norm) and norm.kernels is kernels
    x = torch.randn(64, 10).t()  # rows of a transposed view: not contiguous
    torch.testing.assert_close(norm(x), F.rms_norm(x, (64,), norm.weight, 1e-6), rtol=1e-5, atol=1e-5)
    assert not rms_norm.use_rms_norm_kernel(norm.to(torch.bfloat16))


def run_build_command(**env: str) -> subprocess.CompletedProcess:
    """`python -m aptserve.model.cpu_kernels build`, as `make` runs it."""
    return subprocess.run([sys.executable, "-m", "aptserve.model.cpu_kernels", "build"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_build_command_without_kernels_says_so_in_one_line_and_lets_make_go_on(tmp_path):
    result = run_build_command(**{DISABLE_ENV: "0", "APTSERVE_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"CPU kernels: not built (disabled by {DISABLE_ENV}=0): the torch attention path will be used"]


@needs_kernels
def test_build_command_finds_the_build_the_engine_loads_and_compiles_nothing():
    """The build `make` leaves is the one cpu_kernels() loads (same folder, same signature), so serving never compiles;
    a no-op here because importing this file built it."""
    result = run_build_command()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"CPU kernels: up to date ({Path(kernels.__file__).parent})"]


@needs_kernels
def test_a_lock_left_by_a_killed_build_does_not_stop_the_next_load():
    """torch's build lock is a plain file: a build killed mid-way (CI's timeout, ^C) leaves it, and torch's loader then
    waits for it forever. Ours takes a lock the kernel releases, so a leftover file is cleared, not waited on."""
    stale_lock = Path(kernels.__file__).parent / "lock"
    stale_lock.touch()
    try:
        loaded = subprocess.run([sys.executable, "-c", "from aptserve.model.cpu_kernels import cpu_kernels; "
                                 "print(cpu_kernels() is not None)"], capture_output=True, text=True, timeout=120)
        assert loaded.stdout.split() == ["True"], loaded.stderr
        assert not stale_lock.exists()
    finally:
        stale_lock.unlink(missing_ok=True)


def test_plain_paths_without_kernel_or_packing_match_hf(tmp_path, monkeypatch):
    """What runs where oneDNN cannot pack and the kernel cannot build (another CPU, another device)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(model_runner, "cpu_kernels", lambda: None)
    monkeypatch.setattr(rms_norm, "cpu_kernels", lambda: None)
    monkeypatch.setattr(attention, "prefill_kernel_dtypes", frozenset)
    monkeypatch.setattr(linear, "can_pack", lambda weight: False)
    path = save_tiny_llama(tmp_path, num_kv_heads=2, tie_word_embeddings=True)

    runner, manager = make_runner(path, num_units=64, block_size=4)
    assert not runner.metadata_builder.paged_kernel
    assert all(layer.input_layernorm.kernels is None for layer in runner.model.model.layers)
    assert all(layer.self_attn.qkv_proj.packed is None for layer in runner.model.model.layers)
    prompts = random_prompts([5, 17, 30], seed=2)
    requests = [DriverRequest(f"p{i}", p, max_new_tokens=8) for i, p in enumerate(prompts)]
    outputs = Driver(runner, manager, chunk_size=8).run(requests)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for request, prompt in zip(requests, prompts):
        assert_matches_hf_greedy(hf_model, prompt, outputs[request.request_id])
