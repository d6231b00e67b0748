"""The per-step attention plan shared by the attention code and the runner that builds it.

Built once per step for all layers (runner/metadata.py); read by paged_attention (attention.py). Tensors of
unit ids and slots index the cache viewed as [num_units * block_size, kv_dim] (layout: attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from aptserve.model.hidden import HiddenProjection


@dataclass(frozen=True)
class DecodeGroup:
    token_start: int  # rows [token_start, token_end) of the step's flattened batch
    token_end: int
    # For the paged kernel, which reads K/V in place: [n, max_blocks] K and V unit ids, [n] context lengths.
    k_units: torch.Tensor | None = None
    v_units: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    # For the torch path, which gathers first: [2 * n * max_blocks] K unit ids of the group's blocks, then V
    # unit ids (padded with unit 0), and the [n, 1, 1, max_blocks * block_size] additive mask (-inf on padding).
    block_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class PrefillChunk:
    token_start: int
    token_end: int
    # For a chunk that starts after cached rows: [2 * num_blocks] unit ids (all K units, then all V
    # units) of its context, and the causal mask [num_tokens, context_len]. None when start_pos == 0.
    block_ids: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass(frozen=True)
class RecomputeGroup:
    """Hidden requests whose context K/V fit the scratch together: recomputed, then attended on."""

    projection: HiddenProjection  # from the layer's cache into the scratch
    decode_groups: list[DecodeGroup]  # over the scratch
    prefills: list[PrefillChunk]  # chunks after cached rows, over the scratch


@dataclass(frozen=True)
class AttentionMetadata:
    kv_cache: torch.Tensor
    # KV requests' rows: which rows of the step (None: all of them) and their cache slots, flattened
    # over (unit, row): [2, rows], the K slots and the V slots.
    kv_token_rows: torch.Tensor | None
    slot_mapping: torch.Tensor
    # Hidden requests' rows (None: there are none) and the slots of their kv_dim slices (hidden.py).
    hidden_token_rows: torch.Tensor | None
    hidden_slot_mapping: torch.Tensor | None
    # Attention that reads the pages (or fresh K/V): KV requests and hidden prefills from position 0.
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    # Hidden requests that attend over recomputed context K/V, in groups that fit the scratch.
    recompute_groups: list[RecomputeGroup]
    scratch: torch.Tensor
    # Shared by every group and layer (a fresh multi-MB tensor per call costs page faults).
    gather_buffer: torch.Tensor
