"""The resolved configuration the engine runs on: one frozen dataclass per concern, no None left.

Users set flags (`engine_args.EngineArgs`); `engine_args.resolve()` turns them into an `EngineConfig`.
Each value lives in one place: `max_model_len` in the model config, the pool size and the hybrid mode in
the cache config, the token budget and the hidden cache's price in the scheduler config.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from aptserve.logprobs import LogprobsMode

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# vLLM's other names for them (--dtype half / float).
DTYPE_ALIASES = {"half": "float16", "float": "float32"}


class HybridMode(str, enum.Enum):
    AUTO = "auto"  # a flag value only: resolved to ON where the hidden cache is smaller, else OFF
    OFF = "off"  # KV cache only
    ON = "on"  # the policies choose KV or HIDDEN per request
    ALL_HIDDEN = "all-hidden"  # every request HIDDEN (a test and measurement setting)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What the engine and the decoder modules know of a model: its HF config.json, read once by the registry.

    The fields after `intermediate_size` only shape the decoder's arithmetic (model/*): their defaults (HF
    Llama's) serve configs that only carry a shape, such as the simulator's.
    """

    path: str
    architecture: str  # HF model_type: a key of model/architectures.py's ARCHITECTURES
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()
    served_name: str = ""
    # The model's own limit (max_position_embeddings); max_model_len may be set lower, never higher.
    max_position_embeddings: int | None = None
    # Width of the feed-forward layer (Llama: gated, three matrices; OPT: two); 0 when unknown (cost models then
    # take 4 x hidden_size).
    intermediate_size: int = 0
    # The dtype the checkpoint's weights are stored in (config.json's dtype / torch_dtype): what --dtype auto
    # starts from.
    checkpoint_dtype: str = "float32"
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"  # HF's name of the feed-forward activation (Llama: of the gate)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # HF's rope scaling type; the decoders implement "default" only
    tie_word_embeddings: bool = False
    # OPT: pre-LN (else post-LN, opt-350m); the embedding's width when it differs from hidden_size (0: the same,
    # else project_in/project_out); LayerNorm with weight and bias; no final LayerNorm (HF's
    # _remove_final_layer_norm).
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int = 0
    layer_norm_elementwise_affine: bool = True
    remove_final_layer_norm: bool = False

    @property
    def kv_dim(self) -> int:
        """Values per token per layer in one of K or V."""
        return self.num_kv_heads * self.head_dim

    @property
    def hidden_kv_ratio(self) -> float:
        """r = hidden cache size / KV cache size per token (1/2 for MHA, 1.5 for SmolLM2)."""
        return self.hidden_size / (2 * self.kv_dim)

    def with_max_model_len(self, max_model_len: int | None) -> ModelConfig:
        """This config limited to `max_model_len` tokens (None: the model's own limit)."""
        limit = self.max_position_embeddings or self.max_model_len
        if max_model_len is None:
            return replace(self, max_model_len=limit)
        if max_model_len > limit:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit}")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (a prompt token and an output token), got {max_model_len}")
        return replace(self, max_model_len=max_model_len)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int
    # Units in the pool: the byte budget over bytes_per_unit.
    num_units: int
    units_per_hidden_block: int
    hybrid: HybridMode  # never AUTO once resolved
    # Fraction of units kept free when admitting new requests, so decodes do not preempt at once.
    watermark: float
    # Tokens of K/V the runner may recompute from hidden rows at once (one layer); 0 when the hybrid
    # cache is off.
    hidden_scratch_tokens: int
    # Pool units that hold that scratch, lent by the pool only while a request holds hidden rows (cache/manager.py):
    # an engine that admits none has the whole byte budget for KV, as a KV-only one does.
    num_scratch_units: int = 0
    # Full blocks are shared by content across requests of the same cache kind (cache/manager.py).
    enable_prefix_caching: bool = False
    # The element type of the rows the pool holds (K/V and hidden rows): the weights' dtype unless
    # --kv-cache-dtype says otherwise; it sets the bytes of a unit, so a byte budget holds twice the tokens in bf16.
    dtype: str = "float32"


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: str  # a name in aptserve.sched.POLICIES
    max_num_seqs: int
    max_num_batched_tokens: int
    # Default SLOs (seconds) of requests that do not bring their own.
    ttft_slo_s: float
    tbt_slo_s: float
    # While requests decode, the share of their tightest TBT SLO one step may take (prompt chunks are sized to
    # it with the measured step cost); 0: only the token budget bounds a step.
    step_tbt_fraction: float
    # Seconds to re-project one block's K/V across all layers: the hidden cache's price (apt policies).
    alpha_s: float
    # K/V may become hidden rows in place, solved back through each layer's K/V left inverse (which the model then
    # keeps): where memory runs out, a running KV request does so (half the memory on multi-head attention) and keeps
    # decoding instead of being freed to prefill again (apt policies, hybrid on); so does a requested KV -> HIDDEN.
    demote_in_place: bool = False

    def request_slos(self, ttft_slo_s: float | None, tbt_slo_s: float | None) -> tuple[float, float]:
        """A request's (TTFT, TBT) SLOs: its own where it brought them, these defaults where it did not."""
        return (self.ttft_slo_s if ttft_slo_s is None else ttft_slo_s,
                self.tbt_slo_s if tbt_slo_s is None else tbt_slo_s)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    dtype: str  # the weights' and the activations' (resolved: never "auto")
    device: str
    seed: int
    # Most alternatives per token a request may ask log probabilities of, and which distribution they come from.
    max_logprobs: int = 20
    logprobs_mode: LogprobsMode = LogprobsMode.RAW
    # On a CPU, each step's torch threads are the cores other processes leave free (runner/cpu_threads.py).
    cpu_threads_follow_load: bool = True
