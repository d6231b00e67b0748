"""Paged attention over the runner's cache tensor, with per-step metadata built once for all layers.

Cache layout: `kv_cache[num_layers, num_units, block_size, kv_dim]`. A KV request's table is
[k0, v0, k1, v1, ...]: the token at absolute position t lives in block b = t // block_size, row
t % block_size; its K row is in unit table[2b] and its V row in unit table[2b + 1].

A step's tokens are ordered decodes first (one token each, by context length), then prefill chunks.
Decodes attend in groups: each group's K/V blocks are gathered into a padded [n, max_blocks * block_size]
layout and attended in one batched SDPA call. On CPU a group's gather is kept a few MiB, so SDPA reads
it from cache rather than from memory (about 2x faster attention at batch 64, context 200, than one big
gather); elsewhere the cap only bounds the buffer. Each prefill chunk attends on its own: causally
over its fresh K/V when it starts at 0, else over its gathered context with an offset causal mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KV_UNITS_PER_BLOCK = 2


def default_decode_group_bytes(device: torch.device) -> int:
    """Cap of one decode group's gathered K/V: cache-sized on CPU, a memory bound elsewhere."""
    return 3 * 1024**2 if device.type == "cpu" else 512 * 1024**2


@dataclass(frozen=True)
class DecodeGroup:
    token_start: int  # rows [token_start, token_end) of the step's flattened batch
    token_end: int
    # [2 * n * max_blocks]: K unit ids of the group's blocks, then V unit ids (padded with unit 0).
    block_ids: torch.Tensor
    # [n, 1, 1, max_blocks * block_size] additive mask: 0 over each context, -inf on padding.
    mask: torch.Tensor


@dataclass(frozen=True)
class PrefillChunk:
    token_start: int
    token_end: int
    # For a chunk that starts after cached rows: [2 * num_blocks] unit ids (all K units, then all V
    # units) of its context, and the causal mask [num_tokens, context_len]. None when start_pos == 0.
    block_ids: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass(frozen=True)
class AttentionMetadata:
    kv_cache: torch.Tensor
    # Cache rows to write, flattened over (unit, row): K slots of the step's tokens, then V slots.
    slot_mapping: torch.Tensor
    num_decode_tokens: int
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    # Shared by every group and layer (a fresh multi-MB tensor per call costs page faults).
    gather_buffer: torch.Tensor


def build_attention_metadata(
    kv_cache: torch.Tensor,
    start_pos: list[int],
    num_tokens: list[int],
    unit_ids: list[list[int]],
    num_decodes: int,
    decode_group_bytes: int,
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata and token positions for requests ordered decodes first; vectorised over tokens."""
    device, block_size = kv_cache.device, kv_cache.shape[2]
    max_units = max(len(units) for units in unit_ids)
    tables = torch.tensor([units + [0] * (max_units - len(units)) for units in unit_ids])
    starts, counts = torch.tensor(start_pos), torch.tensor(num_tokens)
    req_of_token = torch.repeat_interleave(torch.arange(len(num_tokens)), counts)
    first_row = torch.cumsum(counts, 0) - counts
    positions = starts[req_of_token] + torch.arange(int(counts.sum())) - first_row[req_of_token]
    slot_mapping = torch.cat([
        unit_slots(tables, req_of_token, positions, block_size, KV_UNITS_PER_BLOCK, unit_in_block)
        for unit_in_block in (0, 1)  # K rows, then V rows
    ])
    decode_lens = [start + 1 for start in start_pos[:num_decodes]]
    decode_groups = _decode_groups(kv_cache, tables, decode_lens, decode_group_bytes)
    prefills = [
        _prefill_chunk(int(first_row[i]), start_pos[i], num_tokens[i], tables[i], block_size, device)
        for i in range(num_decodes, len(num_tokens))
    ]
    gather_units = max([len(group.block_ids) for group in decode_groups], default=0)
    metadata = AttentionMetadata(
        kv_cache=kv_cache,
        slot_mapping=slot_mapping.to(device),
        num_decode_tokens=num_decodes,
        decode_groups=decode_groups,
        prefills=prefills,
        gather_buffer=kv_cache.new_empty(gather_units, block_size * kv_cache.shape[3]),
    )
    return metadata, positions.to(device)


def unit_slots(tables, req_of_token, positions, block_size: int, units_per_block: int, unit_in_block: int):
    """Flat (unit * block_size + row) slots of each token's row in unit `unit_in_block` of its block."""
    units = tables[req_of_token, positions // block_size * units_per_block + unit_in_block]
    return units * block_size + positions % block_size


def _decode_groups(kv_cache, tables, context_lens: list[int], cap: int) -> list[DecodeGroup]:
    """Split consecutive decodes so that each group's padded K/V gather stays within `cap` bytes."""
    block_size = kv_cache.shape[2]
    block_bytes = KV_UNITS_PER_BLOCK * block_size * kv_cache.shape[3] * kv_cache.element_size()
    groups, start, max_len = [], 0, 0
    for i, context_len in enumerate(context_lens):
        max_len = max(max_len, context_len)
        if i > start and (i + 1 - start) * -(-max_len // block_size) * block_bytes > cap:
            groups.append(_decode_group(kv_cache, tables[start:i], context_lens[start:i], start))
            start, max_len = i, context_len
    if start < len(context_lens):
        groups.append(_decode_group(kv_cache, tables[start:len(context_lens)], context_lens[start:], start))
    return groups


def _decode_group(kv_cache, tables, context_lens: list[int], token_start: int) -> DecodeGroup:
    block_size, num_decodes = kv_cache.shape[2], len(context_lens)
    max_blocks = -(-max(context_lens) // block_size)
    block_ids = tables[:, : max_blocks * KV_UNITS_PER_BLOCK].reshape(num_decodes, max_blocks, 2)
    valid = torch.arange(max_blocks * block_size) < torch.tensor(context_lens)[:, None]
    mask = torch.zeros(valid.shape, dtype=kv_cache.dtype).masked_fill_(~valid, float("-inf"))
    return DecodeGroup(
        token_start, token_start + num_decodes,
        block_ids=block_ids.permute(2, 0, 1).reshape(-1).to(kv_cache.device),
        mask=mask.view(num_decodes, 1, 1, -1).to(kv_cache.device),
    )


def _prefill_chunk(token_start, start_pos, num_tokens, table, block_size, device) -> PrefillChunk:
    block_ids = mask = None
    if start_pos > 0:
        context_len = start_pos + num_tokens
        num_blocks = -(-context_len // block_size)
        block_ids = table[: num_blocks * KV_UNITS_PER_BLOCK].view(num_blocks, 2).T.reshape(-1).to(device)
        query_pos = torch.arange(start_pos, context_len)
        mask = (torch.arange(context_len)[None, :] <= query_pos[:, None]).to(device)
    return PrefillChunk(token_start, token_start + num_tokens, block_ids, mask)


def paged_attention(
    layer_idx: int,
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_metadata: AttentionMetadata,
    scale: float | None = None,
) -> torch.Tensor:
    """Write this step's K/V into the layer's cache and attend; returns [T, num_heads * head_dim].

    x [T, hidden] is the q/k/v projection input (what a hidden cache stores instead of K/V);
    q [T, num_heads, head_dim]; k, v [T, num_kv_heads, head_dim] (RoPE already applied).
    """
    del x  # KV requests need only k and v; the hidden cache path keeps x instead.
    layer_cache = attn_metadata.kv_cache[layer_idx]
    new_rows = torch.cat([k.flatten(1), v.flatten(1)])
    layer_cache.view(-1, new_rows.shape[1]).index_copy_(0, attn_metadata.slot_mapping, new_rows)
    out = torch.empty_like(q)
    for group in attn_metadata.decode_groups:
        rows = slice(group.token_start, group.token_end)
        out[rows] = _decode_attention(q[rows], layer_cache, group, attn_metadata.gather_buffer, scale)
    for chunk in attn_metadata.prefills:
        rows = slice(chunk.token_start, chunk.token_end)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], layer_cache, chunk, scale)
    return out.flatten(1)


def _decode_attention(q, layer_cache, group: DecodeGroup, buffer, scale) -> torch.Tensor:
    num_decodes, num_heads, head_dim = q.shape
    num_kv_heads = layer_cache.shape[-1] // head_dim
    flat_units = layer_cache.view(layer_cache.shape[0], -1)
    gathered = torch.index_select(flat_units, 0, group.block_ids, out=buffer[: len(group.block_ids)])
    # [2, B, S, kv_heads, head_dim] -> K and V as [B, kv_heads, S, head_dim] (strided views, no copy).
    kv = gathered.view(2, num_decodes, -1, num_kv_heads, head_dim).permute(0, 1, 3, 2, 4)
    # GQA without expanding K/V: each KV head's query group is the "query length" of its batch entry.
    q_groups = q.view(num_decodes, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(q_groups, kv[0], kv[1], attn_mask=group.mask, scale=scale)
    return out.reshape(num_decodes, num_heads, head_dim)


def _prefill_attention(q, k, v, layer_cache, chunk: PrefillChunk, scale) -> torch.Tensor:
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if chunk.block_ids is None:
        mask, is_causal = None, True
    else:
        context_len = chunk.mask.shape[1]
        gathered = layer_cache.index_select(0, chunk.block_ids).view(2, -1, num_kv_heads, k.shape[2])
        k, v = gathered[0, :context_len], gathered[1, :context_len]
        mask, is_causal = chunk.mask, False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, is_causal=is_causal,
        scale=scale, enable_gqa=num_heads != num_kv_heads,
    )
    return out.transpose(0, 1)
