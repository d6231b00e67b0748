"""The hidden cache at run time: store x rows, recompute K/V from them, convert between the kinds in place.

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
# Its inverse: (K rows [N, kv_dim] rotated, V rows [N, kv_dim], the positional tables or None) -> x [N, hidden].
InvertKV = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@runtime_checkable
class AttentionLayer(Protocol):
    """One decoder layer's attention, as the hidden cache reaches it (part of model/protocol.py's CausalLM)."""

    def project_kv(self, x: torch.Tensor, rope: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [N, num_kv_heads, head_dim] of the layer's q/k/v projection inputs x [N, hidden_size] (the rows
        a hidden request stores), K rotated by `rope` (the model's rope() at the rows' positions; None: nothing)."""
        ...

    def invert_kv(self, k: torch.Tensor, v: torch.Tensor, rope: Any) -> torch.Tensor:
        """project_kv's inverse: the x [N, hidden_size] whose K (rotated by `rope`) and V rows [N, kv_dim] (as the
        cache holds them) these are. Raises where K and V have fewer values than x (GQA: they do not determine
        it)."""
        ...


def invert_kv(inverse: torch.nn.Module | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x from K rows (RoPE already undone) and V rows [N, kv_dim] through a layer's left inverse
    (linear.kv_left_inverse)."""
    if inverse is None:
        raise RuntimeError("K and V do not determine this layer's input (fewer values than x, or the model was "
                           "prepared without the hidden cache's projections)")
    return inverse(torch.cat([k, v], dim=1))


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


@dataclass(frozen=True)
class KVInversion:
    """Gather K/V rows, solve them back to the layer's inputs x (AttentionLayer.invert_kv), write hidden rows: a KV
    table demoted to hidden rows in place. The destination may reuse source units (cache/manager.py's demote):
    every source row is read before any is written."""

    kv_slots: torch.Tensor  # [2, N] slots of the source K rows and V rows
    rope: Any  # the model's positional tables at the rows' positions (None for OPT)
    dst_slots: torch.Tensor  # [N * u] slots of the hidden rows
    compute_dtype: torch.dtype | None = None

    def run(self, src_flat: torch.Tensor, dst_flat: torch.Tensor, invert: InvertKV) -> None:
        k, v = (src_flat.index_select(0, slots) for slots in self.kv_slots)
        if self.compute_dtype is not None:
            k, v = k.to(self.compute_dtype), v.to(self.compute_dtype)
        write_hidden_rows(dst_flat, invert(k, v, self.rope), self.dst_slots)


def apply_conversions(kv_cache: torch.Tensor, conversions: Sequence[HiddenProjection | KVInversion],
                      attention_layers: Sequence[AttentionLayer]) -> None:
    """Apply a step's conversions (HIDDEN -> KV by projection, KV -> HIDDEN by inversion), every layer, before its
    forward pass.

    They run in the scheduler's order: a later conversion's new units may be an earlier one's freed units (freed
    units are reused first), which that earlier one has read by then.
    """
    for layer_idx, attention in enumerate(attention_layers):
        flat_cache = kv_cache[layer_idx].view(-1, kv_cache.shape[-1])
        for conversion in conversions:
            conversion.run(flat_cache, flat_cache, attention.project_kv if isinstance(conversion, HiddenProjection)
                           else attention.invert_kv)
