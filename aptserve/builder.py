"""Turn an EngineConfig into the engine's parts: model geometry, cache pool, runner, tokenizer."""
from __future__ import annotations

import dataclasses
import logging
import math

from aptserve.cache.manager import CacheManager
from aptserve.config import DTYPE_BYTES, EngineConfig, ModelConfig, SchedulerConfig

logger = logging.getLogger(__name__)


def resolve_scheduler_config(sched: SchedulerConfig, model_config: ModelConfig) -> SchedulerConfig:
    budget = sched.max_num_batched_tokens
    if budget is None:  # whole prompts need room for the longest; chunked policies want small steps
        budget = 512 if sched.policy.endswith("chunked") else max(model_config.max_model_len, 2048)
    return dataclasses.replace(sched, max_model_len=model_config.max_model_len,
                               max_num_batched_tokens=budget)


def resolve_alpha(config: EngineConfig, model_config: ModelConfig, hybrid_cache: str) -> float:
    """--alpha if given; else measured (only the apt policies with the hidden cache on need it)."""
    if config.scheduler.alpha_s is not None:
        return config.scheduler.alpha_s
    if hybrid_cache != "on" or not config.scheduler.policy.startswith("apt"):
        return 0.0
    from aptserve.calibration import calibrated_alpha

    return calibrated_alpha(model_config, config.cache.block_size, config.dtype, config.device)


def units_per_hidden_block(model_config: ModelConfig) -> int:
    return math.ceil(model_config.hidden_size / model_config.kv_dim)


def resolve_hybrid_cache(mode: str, model_config: ModelConfig) -> str:
    """"auto" -> "on" where the hidden cache is smaller than the KV cache (r < 1), else "off"."""
    ratio = model_config.hidden_size / (2 * model_config.kv_dim)
    if mode == "auto":
        if ratio >= 1:
            logger.info("hybrid cache off: a hidden row (%d values) is not smaller than K+V (%d values), "
                        "r = %.2f >= 1 (GQA); it would save no memory", model_config.hidden_size,
                        2 * model_config.kv_dim, ratio)
            return "off"
        return "on"
    if mode == "all-hidden" and ratio >= 1:
        logger.warning("all-hidden on a model with r = %.2f >= 1: the hidden cache is the larger one", ratio)
    return mode


def scratch_bytes(model_config: ModelConfig, hidden_scratch_tokens: int, dtype: str) -> int:
    """Bytes of the per-layer buffer that holds K/V recomputed from hidden rows."""
    return hidden_scratch_tokens * 2 * model_config.kv_dim * DTYPE_BYTES[dtype]


def build_engine_parts(config: EngineConfig):
    from aptserve.model.registry import load_model_config, load_tokenizer, resolve_model
    from aptserve.runner import ModelRunner, bytes_per_unit, min_hidden_scratch_tokens

    path = resolve_model(config.model)
    model_config = load_model_config(path, config.max_model_len, served_name=config.model)
    block_size = config.cache.block_size
    hybrid_cache = resolve_hybrid_cache(config.cache.hybrid_cache, model_config)
    scheduler_config = dataclasses.replace(resolve_scheduler_config(config.scheduler, model_config),
                                           alpha_s=resolve_alpha(config, model_config, hybrid_cache))
    pool_bytes = config.cache.kv_cache_memory
    scratch_tokens = 0
    if hybrid_cache != "off":
        # One request's whole context must fit the recompute scratch on its own.
        scratch_tokens = max(config.cache.hidden_scratch_tokens,
                             min_hidden_scratch_tokens(model_config, block_size))
        pool_bytes -= scratch_bytes(model_config, scratch_tokens, config.dtype)
    num_units = max(0, pool_bytes) // bytes_per_unit(model_config, block_size, config.dtype)
    if num_units < 2:
        raise ValueError(f"kv_cache_memory={config.cache.kv_cache_memory} bytes holds no KV block of this "
                         f"model; give at least {2 * bytes_per_unit(model_config, block_size, config.dtype)}")
    cache = CacheManager(num_units, block_size, units_per_hidden_block(model_config))
    logger.info("cache pool: %d units of %d tokens (%d tokens as KV)", num_units, block_size,
                cache.max_tokens())
    runner = ModelRunner(model_config, num_units, block_size, config.dtype, config.device, config.seed,
                         hidden_scratch_tokens=scratch_tokens)
    return model_config, scheduler_config, hybrid_cache, cache, runner, load_tokenizer(path)
