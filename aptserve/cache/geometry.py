"""How tokens map to cache units and bytes: the one place for units per block and bytes per unit.

A unit is `block_size` tokens x `kv_dim` values in every layer: half a KV block. A KV block takes
`KV_UNITS_PER_BLOCK` units (K, then V); a hidden block takes ceil(hidden_size / kv_dim) units (the hidden
row of a token split into column slices of kv_dim, the last one zero-padded).
"""
from __future__ import annotations

from aptserve.config import DTYPE_BYTES, CacheConfig, HybridMode, ModelConfig

KV_UNITS_PER_BLOCK = 2


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-numerator // denominator)


def hidden_units_per_block(hidden_size: int, kv_dim: int) -> int:
    """Units one block of hidden rows takes (1 for multi-head attention, 3 for SmolLM2's GQA)."""
    return cdiv(hidden_size, kv_dim)


def bytes_per_unit(model_config: ModelConfig, block_size: int, dtype: str) -> int:
    """Bytes of one cache unit: block_size rows of kv_dim values in every layer."""
    return model_config.num_layers * block_size * model_config.kv_dim * DTYPE_BYTES[dtype]


def min_hidden_scratch_tokens(model_config: ModelConfig, block_size: int) -> int:
    """The recompute scratch must hold one request's whole context: max_model_len rounded up to a block."""
    return cdiv(model_config.max_model_len, block_size) * block_size


def scratch_units(model_config: ModelConfig, scratch_tokens: int, block_size: int) -> int:
    """Pool units lent to the recompute scratch while hidden requests are in the pool: the scratch holds one layer's
    K/V of `scratch_tokens` (two one-layer units per block), and a pool unit is one unit in every layer."""
    return cdiv(cdiv(scratch_tokens, block_size) * KV_UNITS_PER_BLOCK, model_config.num_layers)


def max_tokens_of_one_request(cache: CacheConfig) -> int:
    """The most tokens one request is sure to be given room for: the whole pool as KV; where every request is hidden
    rows (ALL_HIDDEN), the pool beside the scratch as hidden rows. With the hybrid cache ON, whether a request runs
    hidden is the policy's choice at each step (batch-aware pricing declines hidden rows that would slow the batch,
    and requests past their SLO get none), so one that fit only as hidden rows could wait forever."""
    if cache.hybrid == HybridMode.ALL_HIDDEN:
        return max(0, cache.num_units - cache.num_scratch_units) // cache.units_per_hidden_block * cache.block_size
    return cache.num_units // KV_UNITS_PER_BLOCK * cache.block_size
