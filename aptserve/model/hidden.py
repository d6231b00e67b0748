"""The hidden cache at run time: store x rows, recompute K/V from them, convert HIDDEN -> KV in place.

A hidden request stores, per layer, the input x of the q/k/v projections (the normed hidden state for
pre-LN models, the residual stream for post-LN OPT) instead of K and V. Its table holds
u = ceil(hidden_size / kv_dim) units per logical block ([h0_0 .. h0_{u-1}, h1_0, ...]); the row of
the token at position t lives in block t // block_size, row t % block_size, split across the block's
u units as column slices of kv_dim, the last one zero-padded. A row is thus u "slots" of the flat
cache view [num_units * block_size, kv_dim], listed row-major (row 0's u slots, then row 1's ...).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from aptserve.cache.geometry import hidden_units_per_block

# A layer's K/V projection: (x [N, hidden], the model's positional tables for the N rows or None)
# -> K, V [N, num_kv_heads, head_dim], RoPE applied.
ProjectKV = Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]


@runtime_checkable
class AttentionLayer(Protocol):
    """One decoder layer's attention, as the hidden cache reaches it (part of model/protocol.py's CausalLM)."""

    def project_kv(self, x: torch.Tensor, rope: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [N, num_kv_heads, head_dim] of the layer's q/k/v projection inputs x [N, hidden_size] (the rows
        a hidden request stores), K rotated by `rope` (the model's rope() at the rows' positions; None: nothing)."""
        ...


def write_kv_rows(flat_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store K and V rows [N, kv_heads, head_dim] (strided views are fine) at their slots [2, N], in the cache's
    dtype."""
    flat_cache.index_copy_(0, slots[0], k.flatten(1).to(flat_cache.dtype))
    flat_cache.index_copy_(0, slots[1], v.flatten(1).to(flat_cache.dtype))


def write_hidden_rows(flat_cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store rows x [N, hidden] at their N * u slots of the layer's flat cache [slots, kv_dim]."""
    kv_dim = flat_cache.shape[1]
    pad = -x.shape[1] % kv_dim
    slices = (F.pad(x, (0, pad)) if pad else x).reshape(-1, kv_dim)
    flat_cache.index_copy_(0, slot_mapping, slices.to(flat_cache.dtype))


def gather_hidden_rows(flat_cache: torch.Tensor, slots: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """The rows [N, hidden_size] whose N * u slots are `slots`."""
    num_slots_per_row = hidden_units_per_block(hidden_size, flat_cache.shape[1])
    gathered = flat_cache.index_select(0, slots).view(-1, num_slots_per_row * flat_cache.shape[1])
    return gathered[:, :hidden_size] if gathered.shape[1] != hidden_size else gathered


@dataclass(frozen=True)
class HiddenProjection:
    """Gather hidden rows, project them to K/V in one GEMM, write K/V rows to a KV-layout destination."""

    hidden_slots: torch.Tensor  # [N * u] slots of the rows in the source cache
    hidden_size: int
    rope: Any  # the model's positional tables at the rows' absolute positions (None for OPT)
    dst_slots: torch.Tensor  # [2, N] slots of the destination (the K rows, and the V rows)
    compute_dtype: torch.dtype | None = None  # the projection's (None: the cache's)

    def run(self, src_flat: torch.Tensor, dst_flat: torch.Tensor, project_kv: ProjectKV) -> None:
        x = gather_hidden_rows(src_flat, self.hidden_slots, self.hidden_size)
        k, v = project_kv(x if self.compute_dtype is None else x.to(self.compute_dtype), self.rope)
        write_kv_rows(dst_flat, self.dst_slots, k, v)


def convert_hidden_to_kv(kv_cache: torch.Tensor, projections: Sequence[HiddenProjection],
                         attention_layers: Sequence[AttentionLayer]) -> None:
    """Apply a step's HIDDEN -> KV conversions, every layer, before its forward pass.

    Projections run in the scheduler's order: a later conversion's new units may be an earlier one's
    freed hidden units (freed units are reused first), which that earlier one has read by then.
    """
    for layer_idx, attention in enumerate(attention_layers):
        flat_cache = kv_cache[layer_idx].view(-1, kv_cache.shape[-1])
        for projection in projections:
            projection.run(flat_cache, flat_cache, attention.project_kv)
