"""Engines on the simulator's cost-model executor, built through the same resolve() as real ones."""
from __future__ import annotations

from aptserve.cache.geometry import bytes_per_unit, min_hidden_scratch_tokens, scratch_units
from aptserve.config import HybridMode, ModelConfig
from aptserve.engine_args import EngineArgs, resolve_hybrid_cache
from aptserve.sched import policy_class


def pool_bytes(model: ModelConfig, num_units: int, block_size: int, hybrid_cache: str = "off",
               hidden_scratch_tokens: int = EngineArgs.hidden_scratch_tokens,
               scheduler: str = EngineArgs.scheduler) -> int:
    """The --kv-cache-memory that leaves exactly `num_units` units to requests while the recompute scratch is lent
    its units (the pool holds those too)."""
    if resolve_hybrid_cache(HybridMode(hybrid_cache), model, policy_class(scheduler)) != HybridMode.OFF:
        num_units += scratch_units(model, max(hidden_scratch_tokens, min_hidden_scratch_tokens(model, block_size)),
                                   block_size)
    return num_units * bytes_per_unit(model, block_size, "float32")


def sim_args(model: ModelConfig, num_units: int, block_size: int, hybrid_cache: str = "off", **kwargs) -> EngineArgs:
    """EngineArgs for `model` (fp32) whose pool holds `num_units` units; alpha 0 unless given. The scratch is sized
    for the model's own max_model_len (the engine's least would follow the context it caps to the pool)."""
    kwargs.setdefault("alpha", 0.0)
    kwargs.setdefault("hidden_scratch_tokens", min_hidden_scratch_tokens(model, block_size))
    return EngineArgs(model="sim", block_size=block_size, hybrid_cache=hybrid_cache,
                      kv_cache_memory=pool_bytes(model, num_units, block_size, hybrid_cache,
                                                 kwargs["hidden_scratch_tokens"],
                                                 scheduler=kwargs.get("scheduler", EngineArgs.scheduler)), **kwargs)
