"""Turn an EngineConfig into the engine's parts: model geometry, cache pool, runner, tokenizer."""
from __future__ import annotations

import dataclasses
import logging
import math

from aptserve.cache.manager import CacheManager
from aptserve.config import EngineConfig, ModelConfig, SchedulerConfig

logger = logging.getLogger(__name__)


def resolve_scheduler_config(sched: SchedulerConfig, model_config: ModelConfig) -> SchedulerConfig:
    budget = sched.max_num_batched_tokens
    if budget is None:
        budget = max(model_config.max_model_len, 2048)
    return dataclasses.replace(sched, max_model_len=model_config.max_model_len,
                               max_num_batched_tokens=budget)


def units_per_hidden_block(model_config: ModelConfig) -> int:
    return math.ceil(model_config.hidden_size / model_config.kv_dim)


def build_engine_parts(config: EngineConfig):
    from aptserve.model.registry import load_model_config, load_tokenizer, resolve_model
    from aptserve.runner import ModelRunner, bytes_per_unit

    path = resolve_model(config.model)
    model_config = load_model_config(path, config.max_model_len, served_name=config.model)
    scheduler_config = resolve_scheduler_config(config.scheduler, model_config)
    block_size = config.cache.block_size
    num_units = config.cache.kv_cache_memory // bytes_per_unit(model_config, block_size, config.dtype)
    if num_units < 2:
        raise ValueError(f"kv_cache_memory={config.cache.kv_cache_memory} bytes holds no KV block of this "
                         f"model; give at least {2 * bytes_per_unit(model_config, block_size, config.dtype)}")
    cache = CacheManager(num_units, block_size, units_per_hidden_block(model_config))
    logger.info("cache pool: %d units of %d tokens (%d tokens as KV)", num_units, block_size,
                cache.max_tokens())
    runner = ModelRunner(model_config, num_units, block_size, config.dtype, config.device, config.seed)
    return model_config, scheduler_config, cache, runner, load_tokenizer(path)
