"""Paged attention over the runner's cache tensor, for requests with a KV or a hidden cache.

Cache layout: `kv_cache[num_layers, num_units, block_size, kv_dim]`. A KV request's table is
[k0, v0, k1, v1, ...]: the token at absolute position t lives in block b = t // block_size, row
t % block_size; its K row is in unit table[2b] and its V row in unit table[2b + 1]. A hidden request
keeps the q/k/v projection input x instead (layout: model/hidden.py); before it attends, its context
K/V are recomputed into the scratch, a small buffer laid out like the cache (two units per block), so
the attention below reads every request's K/V from exactly one place: its pages or the scratch.

A step's tokens are ordered KV decodes, hidden decodes (one token each, by context length), then
prefill chunks. Decodes attend in groups: each group's K/V blocks are gathered into a padded
[n, max_blocks * block_size] layout and attended in one batched SDPA call. On CPU a group's gather is
kept a few MiB, so SDPA reads it from cache rather than from memory (about 2x faster attention at
batch 64, context 200, than one big gather); elsewhere the cap only bounds the buffer. Each prefill
chunk attends on its own: causally over its fresh K/V when it starts at 0, else over its gathered
context with an offset causal mask (in bf16 on CPUs with AVX-512 BF16, through our prefill kernel, which skips the
tiles above the offset diagonal). The per-step metadata is built once for all layers (runner/metadata.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from aptserve.model.attention_metadata import AttentionMetadata, DecodeGroup, PrefillChunk
from aptserve.model.cpu_kernels import cpu_kernels
from aptserve.model.hidden import ProjectKV, write_hidden_rows, write_kv_rows


def paged_attention(
    layer_idx: int,
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_metadata: AttentionMetadata,
    project_kv: ProjectKV,
    scale: float | None = None,
) -> torch.Tensor:
    """Store this step's cache rows (K/V or x) in the layer's cache and attend; returns [T, heads * dim].

    x [T, hidden] is the q/k/v projection input; q [T, num_heads, head_dim]; k, v [T, num_kv_heads,
    head_dim] (RoPE already applied); `project_kv(x, rope)` is the layer's K/V projection, which
    recomputes hidden requests' context K/V.
    """
    md = attn_metadata
    layer_cache = md.kv_cache[layer_idx]
    flat_cache = layer_cache.view(-1, layer_cache.shape[-1])
    kv_k, kv_v = (k, v) if md.kv_token_rows is None else (k[md.kv_token_rows], v[md.kv_token_rows])
    write_kv_rows(flat_cache, md.slot_mapping, kv_k, kv_v)
    if md.hidden_token_rows is not None:
        write_hidden_rows(flat_cache, x[md.hidden_token_rows], md.hidden_slot_mapping)
    out = torch.empty_like(q)
    _attend(out, q, k, v, layer_cache, md.decode_groups, md.prefills, md.gather_buffer, scale)
    scratch_flat = md.scratch.view(-1, md.scratch.shape[-1])
    for group in md.recompute_groups:  # the scratch is reused: attend on each group before the next
        group.projection.run(flat_cache, scratch_flat, project_kv)
        _attend(out, q, k, v, md.scratch, group.decode_groups, group.prefills, md.gather_buffer, scale)
    return out.flatten(1)


def _attend(out, q, k, v, cache, decode_groups: list[DecodeGroup], prefills: list[PrefillChunk],
            gather_buffer, scale) -> None:
    """Attention of the given decode groups and prefill chunks, whose cached K/V are in `cache`."""
    for group in decode_groups:
        rows = slice(group.token_start, group.token_end)
        out[rows] = _decode_attention(q[rows], cache, group, gather_buffer, scale)
    for chunk in prefills:
        rows = slice(chunk.token_start, chunk.token_end)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], cache, chunk, scale)


def _decode_attention(q, cache, group: DecodeGroup, buffer, scale) -> torch.Tensor:
    num_decodes, num_heads, head_dim = q.shape
    num_kv_heads = cache.shape[-1] // head_dim
    if group.k_units is not None:  # the paged kernel reads K/V where they are (fp32 or bf16), in fp32
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        cpu_kernels().paged_decode_attention(out, q.float().contiguous(), cache, group.k_units, group.v_units,
                                             group.context_lens, head_dim**-0.5 if scale is None else scale,
                                             num_kv_heads)
        return out.to(q.dtype)
    flat_units = cache.view(cache.shape[0], -1)
    gathered = torch.index_select(flat_units, 0, group.block_ids, out=buffer[: len(group.block_ids)])
    # [2, B, S, kv_heads, head_dim] -> K and V as [B, kv_heads, S, head_dim] (strided views, no copy).
    kv = gathered.view(2, num_decodes, -1, num_kv_heads, head_dim).permute(0, 1, 3, 2, 4).to(q.dtype)
    # GQA without expanding K/V: each KV head's query group is the "query length" of its batch entry.
    q_groups = q.view(num_decodes, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(q_groups, kv[0], kv[1], attn_mask=group.mask, scale=scale)
    return out.reshape(num_decodes, num_heads, head_dim)


@functools.cache
def prefill_kernel_dtypes() -> frozenset[torch.dtype]:
    """The dtypes our prefill attention kernel (csrc/prefill_attention.cpp) is built for on this CPU: bf16 where it
    has AVX-512 BF16, none elsewhere (torch's SDPA runs)."""
    kernels = cpu_kernels()
    return frozenset(getattr(torch, name) for name in kernels.prefill_attention_dtypes()) if kernels else frozenset()


def _prefill_attention(q, k, v, cache, chunk: PrefillChunk, scale) -> torch.Tensor:
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if chunk.block_ids is None:
        mask, is_causal = None, True
    else:
        context_len = chunk.mask.shape[1]
        gathered = cache.index_select(0, chunk.block_ids).view(2, -1, num_kv_heads, k.shape[2]).to(q.dtype)
        k, v = gathered[0, :context_len], gathered[1, :context_len]
        mask, is_causal = chunk.mask, False
    if q.device.type == "cpu" and q.dtype in prefill_kernel_dtypes() and k.shape[2] in (32, 64, 128):
        out = torch.empty(q.shape, dtype=q.dtype)  # causal with the offset: keys up to each query's own position
        cpu_kernels().prefill_attention(out, q.contiguous(), k, v, k.shape[0] - q.shape[0],
                                        q.shape[2] ** -0.5 if scale is None else scale)
        return out
    # A batch dim of 1: torch's CPU flash kernel takes only 4-D inputs (3-D falls back to the math path, 2x slower).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=num_heads != num_kv_heads,
    )
    return out[0].transpose(0, 1)
