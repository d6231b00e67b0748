"""Engine configuration: one frozen dataclass per concern, no I/O on construction."""
from __future__ import annotations

from dataclasses import dataclass, field

SCHEDULERS = ("fcfs", "chunked", "apt", "apt-chunked")
HYBRID_CACHE_MODES = ("auto", "off", "all-hidden")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What the engine needs to know of a model's geometry (filled from the HF config by model/registry)."""

    path: str
    architecture: str  # "llama" | "opt"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()
    served_name: str = ""

    @property
    def kv_dim(self) -> int:
        """Values per token per layer in one of K or V."""
        return self.num_kv_heads * self.head_dim

    @property
    def hidden_kv_ratio(self) -> float:
        """r = hidden cache size / KV cache size per token (1/2 for MHA, 1.5 for SmolLM2)."""
        return self.hidden_size / (2 * self.kv_dim)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16
    # Byte budget of the cache pool, same meaning as vLLM's kv_cache_memory_bytes.
    kv_cache_memory: int = 256 * 1024 * 1024
    hybrid_cache: str = "auto"
    # Fraction of units kept free when admitting new requests, so decodes do not preempt at once.
    watermark: float = 0.01
    # Tokens of K/V the runner may recompute from hidden rows at once (one layer); its bytes are taken
    # from kv_cache_memory when the hybrid cache is on, so both engines compare on equal memory.
    hidden_scratch_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive byte count, got {self.kv_cache_memory}")
        if self.hybrid_cache not in HYBRID_CACHE_MODES:
            raise ValueError(f"hybrid_cache must be one of {HYBRID_CACHE_MODES}, got {self.hybrid_cache!r}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: str = "fcfs"
    max_num_seqs: int = 256
    # None: max(max_model_len, 2048) for the non-chunked policies, as vLLM does.
    max_num_batched_tokens: int | None = None
    max_model_len: int = 2048
    # Default SLOs (seconds) for requests that do not bring their own.
    ttft_slo_s: float = 1.0
    tbt_slo_s: float = 1.0
    # Seconds to re-project one block's K/V across all layers; None: measured at start-up.
    alpha_s: float | None = None

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.policy!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str = "default"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    max_model_len: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
