"""The engine flags, declared once, and `resolve()`: flags -> the EngineConfig the engine runs on.

Each field of `EngineArgs` is one flag: `LLM(**kwargs)` takes the field names, the CLI the same names as
`--kebab-case` options (vLLM's names where vLLM has the flag), with the help text and choices given here.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from aptserve.cache.geometry import (KV_UNITS_PER_BLOCK, bytes_per_unit, hidden_units_per_block,
                                     max_tokens_of_one_request, min_hidden_scratch_tokens, scratch_units)
from aptserve.config import (DTYPE_ALIASES, DTYPE_BYTES, CacheConfig, EngineConfig, HybridMode, ModelConfig,
                             SchedulerConfig)
from aptserve.flags import FlagTable, check_positive, flag, parse_bytes
from aptserve.hardware import auto_dtype
from aptserve.logprobs import LogprobsMode
from aptserve.sched import POLICIES, Scheduler, policy_class

logger = logging.getLogger(__name__)

# (model_config, block_size, dtype, device) -> seconds to re-project one block's K/V in every layer.
AlphaFn = Callable[[ModelConfig, int, str, str], float]

# What a running request gives up when memory runs out (resolve_preemption_mode).
PREEMPTION_MODES = ("recompute", "hidden")


def asks_demotion(preemption_mode: str) -> bool:
    """Whether this --preemption-mode demotes K/V to hidden rows in place (and so keeps the K/V left inverses)."""
    return preemption_mode == "hidden"


@dataclass(frozen=True)
class EngineArgs(FlagTable):
    cli_group: ClassVar[str] = "engine"

    model: str = flag("default", "'default' (SmolLM2-135M-Instruct), an OPT shape such as 'opt-125m', "
                      "or the path of a local HF folder (Llama or OPT)")
    dtype: str = flag("auto", "weights' and activations' dtype: 'auto' resolves as vLLM does (on a CPU: bfloat16 where "
                      "it computes bf16 natively, avx512_bf16 or AMX, else float32; on a GPU the checkpoint's, float32 "
                      "checkpoints in half), or float32, bfloat16, float16 (also 'half', 'float')",
                      choices=("auto", *DTYPE_BYTES, *DTYPE_ALIASES))
    kv_cache_dtype: str = flag("auto", "the cache's dtype, of K/V and hidden rows: 'auto' (the weights'), float32, "
                               "bfloat16, float16; it sets the bytes per token, so a byte budget holds twice the "
                               "tokens in 16 bits", choices=("auto", *DTYPE_BYTES))
    device: str = flag("cpu", "torch device")
    seed: int = flag(0, "seed of the sampler (requests without their own seed) and of random weights", int)
    max_model_len: int | None = flag(None, "most tokens per request, prompt and output (default: the model's)",
                                     int)
    kv_cache_memory: int = flag(1 << 30, "cache pool size in bytes (like vLLM's kv_cache_memory_bytes); 512M, "
                                "1G also work", parse_bytes)
    block_size: int = flag(16, "tokens per cache block", int)
    scheduler: str = flag("apt-chunked", "scheduling policy: " + "; ".join(
        f"{name}: {policy.summary}" for name, policy in sorted(POLICIES.items())), choices=tuple(sorted(POLICIES)))
    hybrid_cache: str = flag("auto", "hidden cache: 'auto' (on where it is smaller than KV, for the policies that "
                             "choose it: apt, apt-chunked), 'off', 'on', 'all-hidden'",
                             choices=tuple(m.value for m in HybridMode))
    max_num_seqs: int = flag(256, "most requests in one batch", int)
    max_num_batched_tokens: int | None = flag(
        None, "most tokens per step (default: the policy's; " + ", ".join(
            f"{name} {policy.default_max_num_batched_tokens}" for name, policy in sorted(POLICIES.items())
            if policy.default_max_num_batched_tokens) + ", max(max_model_len, 2048) for the others)", int)
    enable_prefix_caching: bool = flag(True, "reuse the cached blocks of a prompt's longest cached prefix instead "
                                       "of computing them (as vLLM; per cache kind)",
                                       action=argparse.BooleanOptionalAction)
    watermark: float = flag(0.01, "fraction of the pool kept free when admitting new requests", float)
    cpu_threads_follow_load: bool = flag(
        True, "on a CPU, run each step on the cores the other processes leave free (measured over the last 0.2 s), "
        "at most torch's thread count: a thread sharing a core with a busy process stalls the others at every "
        "barrier", action=argparse.BooleanOptionalAction)
    warm_up: bool = flag(True, "a served engine runs three prompts before its first request and fits its step-time "
                         "model on them (1-2 s of the start on a 2-core CPU)", action=argparse.BooleanOptionalAction)
    # The least that works by default: it borrows pool units while hidden rows are held, and batch-aware pricing
    # makes hidden rows rare, so a larger scratch (several hidden requests per GEMM) would cost KV rows in use.
    hidden_scratch_tokens: int = flag(0, "tokens of K/V recomputed from hidden rows at once; the pool lends its "
                                      "units while hidden rows are held (default and least: one max_model_len "
                                      "context)", int)
    preemption_mode: str = flag("recompute", "what a running request gives up when memory runs out: 'recompute' "
                                "(its cache is freed and it prefills again later, as vLLM), 'hidden' (its K/V are "
                                "solved back to hidden rows, half the memory on multi-head attention, and it keeps "
                                "decoding while the step time allows it under an apt policy, else recompute; the "
                                "model keeps each layer's K/V left inverse for it, as large as its k|v projection)",
                                choices=PREEMPTION_MODES)
    alpha: float | None = flag(None, "seconds to re-project one block's K/V across all layers (the hidden "
                               "cache's price in the apt policies); default: measured at start-up", float)
    max_logprobs: int = flag(20, "most log probabilities one request may ask for per token (vLLM's cap; -1: the "
                             "whole vocabulary)", int)
    logprobs_mode: str = flag(LogprobsMode.RAW.value, "which distribution returned log probabilities come from: "
                              "the model's (raw_logprobs) or the one sampled from after penalties, bias, "
                              "temperature and top-k/top-p/min-p (processed_logprobs)",
                              choices=tuple(m.value for m in LogprobsMode))
    ttft_slo: float = flag(1.0, "default time-to-first-token SLO (s) of requests without their own", float)
    tbt_slo: float = flag(1.0, "default time-between-tokens SLO (s) of requests without their own", float)
    step_tbt_fraction: float | None = flag(
        None, "while requests are decoding, keep each step within this fraction of their tightest TBT SLO by "
        "sizing prompt chunks with the step times the engine measures; 0 turns it off (default: "
        "the policy's: " + ", ".join(f"{name} {policy.default_step_tbt_fraction}" for name, policy in
                                     sorted(POLICIES.items()) if policy.default_step_tbt_fraction) +
        ", 0 for the others)", float)



def resolve(args: EngineArgs, model_config: ModelConfig | None = None,
            measure_alpha: AlphaFn | None = None) -> EngineConfig:
    """The EngineConfig for `args`. `model_config`: the geometry of a model without a folder (the
    simulator); default: read from `args.model`'s folder. `measure_alpha`: how to price the hidden cache
    when no --alpha is given (default: timed on this machine)."""
    check_flags(args)
    if model_config is None:
        from aptserve.registry import load_model_config, resolve_model

        model_config = load_model_config(resolve_model(args.model), args.max_model_len, served_name=args.model)
    else:
        model_config = model_config.with_max_model_len(args.max_model_len)
    policy = policy_class(args.scheduler)
    dtype, kv_cache_dtype = resolve_dtypes(args, model_config)
    hybrid = resolve_hybrid_cache(HybridMode(args.hybrid_cache), model_config, policy)
    cache = _cache_config(args, model_config, hybrid, kv_cache_dtype)
    fitting = max_tokens_of_one_request(cache)
    if fitting < model_config.max_model_len:
        if args.max_model_len is not None:  # asked for: kept; requests longer than the pool are refused one by one
            logger.warning("max_model_len=%d does not fit the cache: the whole pool holds %d tokens of one request; "
                           "requests that need more will be refused (raise --kv-cache-memory, or give "
                           "--max-model-len %d or less)", args.max_model_len, fitting, fitting)
        else:  # a server that starts and then refuses every request without max_tokens would be a trap
            logger.warning("max_model_len capped from %d to %d tokens: the cache pool (%d bytes) holds no more of "
                           "one request; raise --kv-cache-memory for the model's whole context",
                           model_config.max_model_len, fitting, args.kv_cache_memory)
            model_config = model_config.with_max_model_len(fitting)
            cache = _cache_config(args, model_config, hybrid, kv_cache_dtype)
    scheduler = SchedulerConfig(
        policy=policy.name, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=_max_num_batched_tokens(args, policy, model_config),
        ttft_slo_s=args.ttft_slo, tbt_slo_s=args.tbt_slo, step_tbt_fraction=_step_tbt_fraction(args, policy),
        alpha_s=resolve_alpha(args, model_config, policy, hybrid, dtype, measure_alpha),
        demote_in_place=resolve_preemption_mode(args.preemption_mode, cache))
    max_logprobs = model_config.vocab_size if args.max_logprobs == -1 else args.max_logprobs
    return EngineConfig(model=model_config, cache=cache, scheduler=scheduler, dtype=dtype,
                        device=args.device, seed=args.seed, max_logprobs=max_logprobs,
                        logprobs_mode=LogprobsMode(args.logprobs_mode),
                        cpu_threads_follow_load=args.cpu_threads_follow_load)


def check_flags(args: EngineArgs) -> None:
    """The flags' own checks (ValueError), needing no model: `aptserve serve` runs them before it starts anything."""
    check_positive({"block_size": args.block_size, "kv_cache_memory": args.kv_cache_memory,
                    "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens})
    if args.dtype not in ("auto", *DTYPE_BYTES, *DTYPE_ALIASES):
        raise ValueError(f"dtype must be auto or one of {', '.join((*DTYPE_BYTES, *DTYPE_ALIASES))}, got {args.dtype!r}")
    if args.kv_cache_dtype not in ("auto", *DTYPE_BYTES):
        raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(DTYPE_BYTES)}, got {args.kv_cache_dtype!r}")
    policy_class(args.scheduler)  # raises for an unknown name
    if args.hybrid_cache not in {mode.value for mode in HybridMode}:
        raise ValueError(f"hybrid_cache must be one of {[m.value for m in HybridMode]}, got {args.hybrid_cache!r}")
    if args.preemption_mode not in PREEMPTION_MODES:
        raise ValueError(f"preemption_mode must be one of {list(PREEMPTION_MODES)}, got {args.preemption_mode!r}")
    if args.max_logprobs < -1:
        raise ValueError(f"max_logprobs must be -1 (no cap) or >= 0, got {args.max_logprobs}")
    if args.logprobs_mode not in {m.value for m in LogprobsMode}:
        raise ValueError(f"logprobs_mode must be one of {[m.value for m in LogprobsMode]}, got {args.logprobs_mode!r}")
    if not 0 <= args.watermark < 1:
        raise ValueError(f"watermark must be in [0, 1), got {args.watermark}")


def resolve_dtypes(args: EngineArgs, model_config: ModelConfig) -> tuple[str, str]:
    """(the weights' dtype, the cache's) of --dtype and --kv-cache-dtype; an 'auto' dtype is chosen and logged here."""
    dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    if dtype == "auto":
        dtype, why = auto_dtype(model_config.checkpoint_dtype, args.device)
        logger.info("dtype auto: %s (%s)", dtype, why)
    return dtype, dtype if args.kv_cache_dtype == "auto" else args.kv_cache_dtype


def resolve_hybrid_cache(mode: HybridMode, model_config: ModelConfig, policy: type[Scheduler]) -> HybridMode:
    """AUTO -> ON where the hidden cache is smaller than the KV cache (r < 1) and the policy chooses cache kinds,
    else OFF: under a policy that never chooses HIDDEN the scratch would only take memory. ON is kept for such a
    policy (kinds are then set by hand: LLMEngine.convert_request); the context stays what fits as KV
    (geometry.max_tokens_of_one_request)."""
    ratio = model_config.hidden_kv_ratio
    if mode == HybridMode.AUTO and not policy.prices_hidden_cache:
        logger.info("hybrid cache off: the %s policy never chooses the hidden cache", policy.name)
        return HybridMode.OFF
    if mode == HybridMode.AUTO:
        if ratio >= 1:
            logger.info("hybrid cache off: a hidden row (%d values) is not smaller than K+V (%d values), "
                        "r = %.2f >= 1 (GQA); it would save no memory", model_config.hidden_size,
                        2 * model_config.kv_dim, ratio)
            return HybridMode.OFF
        return HybridMode.ON
    if mode != HybridMode.OFF and ratio >= 1:
        logger.warning("hybrid cache %s on a model with r = %.2f >= 1: the hidden cache is the larger one",
                       mode.value, ratio)
    return mode


def resolve_preemption_mode(mode: str, cache: CacheConfig) -> bool:
    """Whether K/V may become hidden rows in place (SchedulerConfig.demote_in_place): only when asked ('hidden'; a
    ValueError where they cannot). Preemption then demotes under the apt policies, which price the step time it
    costs; requested KV -> HIDDEN conversions (LLMEngine.convert_request) go in place under any policy. Not by
    default: the left inverse it needs costs a sixth of an OPT layer's weights in memory (OPT-30B in fp16: 9.9 GB,
    beside a KV budget of 15.5 GiB on one A100-80GB), and the apt policies' own price let it fire in no measured
    cell (benchmarks/results/demotion_ab.md)."""
    if not asks_demotion(mode):
        return False
    if not (cache.hybrid == HybridMode.ON and cache.units_per_hidden_block < KV_UNITS_PER_BLOCK):
        raise ValueError("preemption_mode 'hidden' needs the hybrid cache on (not all-hidden) and a model whose "
                         "hidden rows are smaller than K+V (multi-head attention)")
    return True


def resolve_alpha(args: EngineArgs, model_config: ModelConfig, policy: type[Scheduler], hybrid: HybridMode,
                  dtype: str, measure_alpha: AlphaFn | None = None) -> float:
    """--alpha if given; else measured (only policies that price the hidden cache use it, and only when it is on)."""
    if args.alpha is not None:
        return args.alpha
    if hybrid != HybridMode.ON or not policy.prices_hidden_cache:
        return 0.0
    if measure_alpha is None:
        from aptserve.calibration import calibrated_alpha as measure_alpha
    return measure_alpha(model_config, args.block_size, dtype, args.device)


def _step_tbt_fraction(args: EngineArgs, policy: type[Scheduler]) -> float:
    if args.step_tbt_fraction is not None:
        if not 0 <= args.step_tbt_fraction <= 1:
            raise ValueError(f"step_tbt_fraction must be in [0, 1], got {args.step_tbt_fraction}")
        return args.step_tbt_fraction
    return policy.default_step_tbt_fraction


def _max_num_batched_tokens(args: EngineArgs, policy: type[Scheduler], model_config: ModelConfig) -> int:
    if args.max_num_batched_tokens is not None:
        return args.max_num_batched_tokens
    # Whole prompts need room for the longest; chunked policies want small steps.
    return policy.default_max_num_batched_tokens or max(model_config.max_model_len, 2048)


def _cache_config(args: EngineArgs, model_config: ModelConfig, hybrid: HybridMode, dtype: str) -> CacheConfig:
    """Size the pool from the byte budget; when the hidden cache may be used, the recompute scratch borrows units
    of it while hidden rows are held."""
    scratch_tokens = 0
    if hybrid != HybridMode.OFF:  # one request's whole context must fit the scratch on its own
        scratch_tokens = max(args.hidden_scratch_tokens, min_hidden_scratch_tokens(model_config, args.block_size))
    unit_bytes = bytes_per_unit(model_config, args.block_size, dtype)
    num_units = max(0, args.kv_cache_memory) // unit_bytes
    if num_units < KV_UNITS_PER_BLOCK:
        raise ValueError(f"kv_cache_memory={args.kv_cache_memory} bytes holds no KV block of this model; "
                         f"give at least {KV_UNITS_PER_BLOCK * unit_bytes}")
    logger.info("cache pool: %d units of %d tokens (%d tokens as KV, %s)", num_units, args.block_size,
                num_units // KV_UNITS_PER_BLOCK * args.block_size, dtype)
    return CacheConfig(block_size=args.block_size, num_units=num_units,
                       units_per_hidden_block=hidden_units_per_block(model_config.hidden_size, model_config.kv_dim),
                       hybrid=hybrid, watermark=args.watermark, hidden_scratch_tokens=scratch_tokens,
                       num_scratch_units=scratch_units(model_config, scratch_tokens, args.block_size),
                       enable_prefix_caching=args.enable_prefix_caching, dtype=dtype)
