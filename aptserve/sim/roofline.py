"""A roofline cost model of one engine step on GPUs: each phase takes the longer of its bytes over HBM bandwidth
and its FLOPs over peak, at achievable fractions of both, plus a fixed overhead per step and, with tensor
parallelism, two all-reduces per layer.

Phases per layer: the dense GEMMs (the layer's weights read once per step, 2 FLOPs per weight per token), the
attention of each request (its cached K/V read once; 4 FLOPs per query-key pair and head dimension), and for
hidden-cache requests the recompute of K/V from the stored hidden rows (the rows read in full on every GPU, a GEMM
of 2 x hidden x 2 x kv_dim FLOPs per row). Conversions (hidden -> KV in place) cost one such recompute. The vocabulary
head runs on sampled rows only. Memory bookkeeping stays the engine's: this model only prices steps.
"""
from __future__ import annotations

from dataclasses import dataclass

from aptserve.cache.tables import CacheKind
from aptserve.config import DTYPE_BYTES, ModelConfig
from aptserve.model.architectures import ARCHITECTURES
from aptserve.sched.output import SchedulerOutput
from aptserve.sim.gpus import GPUSpec

ALL_REDUCES_PER_LAYER = 2  # after attention and after the feed-forward layer (Megatron-style)


@dataclass(frozen=True)
class RooflineCostModel:
    model: ModelConfig
    gpu: GPUSpec
    tensor_parallel: int = 1
    dtype: str = "float16"
    flops_efficiency: float = 0.6  # achievable share of peak in GEMMs and attention
    bandwidth_efficiency: float = 0.8  # achievable share of HBM bandwidth
    step_overhead_s: float = 0.004  # scheduling, input preparation, kernel launches, sampling
    all_reduce_latency_s: float = 10e-6

    # --- the model's sizes -------------------------------------------------------------------
    @property
    def bytes_per_value(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def intermediate_size(self) -> int:
        return self.model.intermediate_size or 4 * self.model.hidden_size

    @property
    def kv_projection_params(self) -> int:
        """One layer's k and v projections (hidden x 2 kv_dim); its K/V left inverse is as large."""
        return 2 * self.model.hidden_size * self.model.kv_dim

    @property
    def layer_params(self) -> int:
        m = self.model
        query_dim = m.num_heads * m.head_dim
        attention = 2 * m.hidden_size * query_dim + self.kv_projection_params  # q, o; k, v
        ffn_matrices = ARCHITECTURES[m.architecture].ffn_matrices
        return attention + ffn_matrices * m.hidden_size * self.intermediate_size

    @property
    def weight_bytes(self) -> int:
        """All weights (layers and the embedding, tied or not counted twice), across every GPU."""
        return (self.model.num_layers * self.layer_params + self.model.vocab_size * self.model.hidden_size) \
            * self.bytes_per_value

    @property
    def kv_inverse_bytes(self) -> int:
        """Each layer's K/V left inverse (hidden x 2 kv_dim values), which an engine that demotes K/V to hidden rows
        in place keeps besides its weights (--preemption-mode hidden), across every GPU."""
        return self.model.num_layers * self.kv_projection_params * self.bytes_per_value

    # --- pricing -------------------------------------------------------------------------------
    def _phase_s(self, num_bytes: float, flops: float) -> float:
        return max(num_bytes / (self.gpu.hbm_bytes_per_s * self.bandwidth_efficiency),
                   flops / (self.gpu.peak_fp16_flops * self.flops_efficiency))

    def _recompute_s(self, num_rows: int) -> float:
        """One layer's K/V re-projected from `num_rows` hidden rows (read in full on every GPU)."""
        m, b, tp = self.model, self.bytes_per_value, self.tensor_parallel
        num_bytes = num_rows * m.hidden_size * b + num_rows * 2 * m.kv_dim * b / tp
        return self._phase_s(num_bytes, 2 * num_rows * m.hidden_size * 2 * m.kv_dim / tp)

    def _attention_s(self, num_tokens: int, start_pos: int) -> float:
        """One layer's attention of one request: its cached K/V read once, every query-key pair computed."""
        m, b, tp = self.model, self.bytes_per_value, self.tensor_parallel
        context = start_pos + num_tokens
        pairs = num_tokens * start_pos + num_tokens * (num_tokens + 1) // 2
        return self._phase_s(context * 2 * m.kv_dim * b / tp, 4 * pairs * m.num_heads * m.head_dim / tp)

    def _all_reduce_s(self, num_tokens: int) -> float:
        tp = self.tensor_parallel
        if tp == 1:
            return 0.0
        num_bytes = num_tokens * self.model.hidden_size * self.bytes_per_value
        return ALL_REDUCES_PER_LAYER * (2 * (tp - 1) / tp * num_bytes / self.gpu.link_bytes_per_s
                                        + self.all_reduce_latency_s)

    def step_time(self, sched_out: SchedulerOutput) -> float:
        m, b, tp = self.model, self.bytes_per_value, self.tensor_parallel
        num_tokens = sched_out.total_num_scheduled_tokens
        if num_tokens == 0 and not sched_out.conversions:
            return 0.0
        activation_bytes = num_tokens * (2 * m.hidden_size + self.intermediate_size) * b
        # Conversions alone read only the K/V projection weights (in _recompute_s's GEMM), not the layer's.
        weight_bytes = (self.layer_params if num_tokens else self.kv_projection_params) * b / tp
        dense_s = self._phase_s(weight_bytes + activation_bytes, 2 * num_tokens * self.layer_params / tp)
        attention_s = sum(self._attention_s(r.num_tokens, r.start_pos) for r in sched_out.scheduled)
        recompute_s = sum(self._recompute_s(r.start_pos) for r in sched_out.scheduled
                          if r.cache_kind == CacheKind.HIDDEN)
        recompute_s += sum(self._recompute_s(c.num_tokens) for c in sched_out.conversions)
        layer_s = dense_s + attention_s + recompute_s + self._all_reduce_s(num_tokens)
        num_sampled = sum(1 for r in sched_out.scheduled if r.sample)
        head_params = m.vocab_size * m.hidden_size
        head_s = self._phase_s(head_params * b / tp, 2 * num_sampled * head_params / tp) if num_tokens else 0.0
        return self.step_overhead_s + m.num_layers * layer_s + head_s

    def alpha_s(self, model_config: ModelConfig, block_size: int, dtype: str, device: str) -> float:
        """The hidden cache's price (the scheduler's alpha): seconds to re-project one block in every layer."""
        return model_config.num_layers * self._recompute_s(block_size)

    def kv_cache_bytes(self, max_num_batched_tokens: int, gpu_memory_utilization: float = 0.9,
                       demote_in_place: bool = False) -> int:
        """The cache pool across all GPUs, as vLLM sizes it: each GPU's share of memory, less its weights (with the
        K/V left inverses where the engine demotes in place) and the activations of the largest step (here
        estimated, where vLLM profiles a forward pass)."""
        m, b, tp = self.model, self.bytes_per_value, self.tensor_parallel
        activations = max_num_batched_tokens * (4 * m.hidden_size + 2 * self.intermediate_size // tp) * b
        logits = max_num_batched_tokens * m.vocab_size * 4 // tp  # fp32 logits of a whole step, at worst
        weights = self.weight_bytes + (self.kv_inverse_bytes if demote_in_place else 0)
        per_gpu = int(self.gpu.memory_bytes * gpu_memory_utilization) - weights // tp - activations - logits
        if per_gpu <= 0:
            raise ValueError(f"{m.served_name or m.path} does not fit {tp} x {self.gpu.name} "
                             f"({weights / 2**30:.1f} GiB of weights)")
        return per_gpu * tp
