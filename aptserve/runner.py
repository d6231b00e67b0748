"""ModelRunner: a SchedulerOutput -> input tensors -> one forward -> logits of sampled rows -> tokens.

Stateless about cache bookkeeping: each step brings every request's new tokens, start position and
whole unit table; the runner owns only the cache tensor and the sampler's per-request generators.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from itertools import accumulate

import torch

from aptserve.cache.manager import CacheKind
from aptserve.config import ModelConfig
from aptserve.model.attention import AttentionMetadata, build_attention_metadata, default_decode_group_bytes
from aptserve.model.loader import load_model, torch_dtype
from aptserve.sampler import Sampler
from aptserve.sched.output import RunnerOutput, ScheduledRequest, SchedulerOutput

# CPU threads for torch; unset keeps torch's default (OMP_NUM_THREADS, else one per core).
NUM_THREADS_ENV = "APTSERVE_NUM_THREADS"


def bytes_per_unit(model_config: ModelConfig, block_size: int, dtype: str | torch.dtype) -> int:
    """Bytes of one cache unit: block_size rows of kv_dim values in every layer."""
    itemsize = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    return model_config.num_layers * block_size * model_config.kv_dim * itemsize


@dataclass(frozen=True)
class ModelInput:
    """One step's tensors, tokens ordered decodes first, then prefill chunks."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    # Rows whose logits are sampled (each sampled request's last row), and those requests.
    logits_indices: torch.Tensor
    sampled: list[ScheduledRequest]


class ModelRunner:
    def __init__(self, model_config: ModelConfig, num_units: int, block_size: int, dtype: str,
                 device: str, seed: int = 0) -> None:
        self.device = torch.device(device)
        if self.device.type == "cpu" and os.environ.get(NUM_THREADS_ENV):
            torch.set_num_threads(int(os.environ[NUM_THREADS_ENV]))
        self.model_config = model_config
        self.dtype = torch_dtype(dtype)
        self.model = load_model(model_config, self.dtype, self.device)
        # Zeroed, not empty: padded rows are masked out, but NaN garbage would still poison P @ V.
        cache_shape = (model_config.num_layers, num_units, block_size, model_config.kv_dim)
        self.kv_cache = torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
        self.sampler = Sampler(seed, self.device)
        self.decode_group_bytes = default_decode_group_bytes(self.device)

    @torch.inference_mode()
    def execute(self, sched_out: SchedulerOutput) -> RunnerOutput:
        start_s = time.perf_counter()
        self.sampler.forget(sched_out.finished_req_ids)
        if sched_out.is_empty:
            return RunnerOutput(elapsed_s=0.0)
        model_input = self.prepare_inputs(sched_out.scheduled)
        hidden = self.model(model_input.input_ids, model_input.positions, model_input.attn_metadata)
        sampled_token_ids: dict[str, int] = {}
        if model_input.sampled:
            logits = self.model.compute_logits(hidden[model_input.logits_indices])
            req_ids = [r.req_id for r in model_input.sampled]
            params = [r.sampling_params for r in model_input.sampled]
            sampled_token_ids = dict(zip(req_ids, self.sampler(logits, req_ids, params)))
        if self.device.type == "cuda":  # A step that samples nothing has not waited for its kernels.
            torch.cuda.synchronize(self.device)
        return RunnerOutput(sampled_token_ids, elapsed_s=time.perf_counter() - start_s)

    def prepare_inputs(self, scheduled: list[ScheduledRequest]) -> ModelInput:
        """Decodes first (they attend in batched groups), then prefill chunks."""
        for request in scheduled:
            if request.cache_kind != CacheKind.KV:
                raise NotImplementedError(f"{request.req_id}: only KV cache requests are supported yet")
        # Similar context lengths side by side keep each decode group's padding small.
        decodes = sorted((r for r in scheduled if r.num_tokens == 1), key=lambda r: r.start_pos)
        ordered = decodes + [r for r in scheduled if r.num_tokens > 1]
        attn_metadata, positions = build_attention_metadata(
            self.kv_cache, [r.start_pos for r in ordered], [r.num_tokens for r in ordered],
            [r.unit_ids for r in ordered], len(decodes), self.decode_group_bytes,
        )
        input_ids = torch.tensor([t for r in ordered for t in r.token_ids], device=self.device)
        row_ends = accumulate(r.num_tokens for r in ordered)
        last_rows = [end - 1 for end, r in zip(row_ends, ordered) if r.sample]
        logits_indices = torch.tensor(last_rows, dtype=torch.long, device=self.device)
        sampled = [r for r in ordered if r.sample]
        return ModelInput(input_ids, positions, attn_metadata, logits_indices, sampled)
