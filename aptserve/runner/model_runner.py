"""ModelRunner: a SchedulerOutput -> input tensors -> one forward -> logits of sampled rows -> tokens.

Stateless about cache bookkeeping: each step brings every request's new tokens, start position, cache
kind and whole unit table, plus the HIDDEN -> KV conversions to apply first and the pool units lent to the
hidden-cache recompute scratch; the runner owns only the cache tensor and the sampler's per-request generators.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from aptserve.cache.geometry import min_hidden_scratch_tokens, scratch_units
from aptserve.config import EngineConfig, ModelConfig
from aptserve.errors import ConversionFailedError
from aptserve.grammar_compiler import GrammarCompiler
from aptserve.logprobs import LogprobsMode
from aptserve.model.attention_metadata import AttentionMetadata
from aptserve.model.cpu_kernels import cpu_kernels
from aptserve.model.hidden import apply_conversions
from aptserve.model.loader import load_model, torch_dtype
from aptserve.model.protocol import CausalLM
from aptserve.runner.cpu_threads import CpuThreadBudget
from aptserve.runner.metadata import AttentionMetadataBuilder, order_for_step
from aptserve.runner.prompt_logprobs import prompt_logprobs, wants_prompt_logprobs
from aptserve.runner.sampler import Sampler
from aptserve.sched.output import RunnerOutput, ScheduledRequest, SchedulerOutput

# CPU threads for torch; unset keeps torch's default (OMP_NUM_THREADS, else one per core).
NUM_THREADS_ENV = "APTSERVE_NUM_THREADS"
# The model and cache dtypes the paged decode kernel serves (it widens bf16 rows to fp32 as it reads them).
PAGED_KERNEL_DTYPES = {torch.float32, torch.bfloat16}


def default_decode_group_bytes(device: torch.device, paged_kernel: bool) -> int:
    """Cap of one decode group's gathered K/V: cache-sized on CPU, a memory bound elsewhere; none for the paged
    kernel, which gathers nothing."""
    if paged_kernel:
        return 1 << 62
    return 3 * 1024**2 if device.type == "cpu" else 512 * 1024**2


@dataclass(frozen=True)
class ModelInput:
    """One step's tensors, tokens ordered decodes first, then prefill chunks."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    # Rows whose logits are sampled (each sampled request's last row), and those requests.
    logits_indices: torch.Tensor
    sampled: list[ScheduledRequest]
    # Requests whose prompt tokens' log probabilities are due this step, with their first row.
    prompt_rows: list[tuple[ScheduledRequest, int]] = ()


class ModelRunner:
    def __init__(self, model_config: ModelConfig, num_units: int, block_size: int, dtype: str,
                 device: str, seed: int = 0, hidden_scratch_tokens: int | None = None,
                 logprobs_mode: LogprobsMode = LogprobsMode.RAW, kv_cache_dtype: str | None = None,
                 demote_in_place: bool = False, cpu_threads_follow_load: bool = False) -> None:
        """`hidden_scratch_tokens`: tokens of K/V recomputed from hidden rows at once (one layer, reused
        across layers); 0 when the hybrid cache is off; None: the minimum, one max_model_len context.
        `demote_in_place`: keep each layer's K/V left inverse, so K/V can become hidden rows in place.
        `kv_cache_dtype`: of the cache and the scratch (None: `dtype`); rows are cast on their way in and out.
        `cpu_threads_follow_load`: each step on the cores other processes leave free (runner/cpu_threads.py)."""
        self.device = torch.device(device)
        if self.device.type == "cpu" and os.environ.get(NUM_THREADS_ENV):
            torch.set_num_threads(int(os.environ[NUM_THREADS_ENV]))
        self.thread_budget = (CpuThreadBudget.for_this_process(torch.get_num_threads())
                              if self.device.type == "cpu" and cpu_threads_follow_load else None)
        self.model_config = model_config
        self.dtype = torch_dtype(dtype)
        num_scratch_blocks = self._num_scratch_blocks(hidden_scratch_tokens, block_size)
        # Without a scratch there is no hidden cache, and nothing needs K/V projected on their own.
        self.model: CausalLM = load_model(model_config, self.dtype, self.device,
                                          keep_kv_projection=num_scratch_blocks > 0,
                                          keep_kv_inverse=demote_in_place and num_scratch_blocks > 0)
        # Zeroed, not empty: padded rows are masked out, but NaN garbage would still poison P @ V.
        cache_shape = (model_config.num_layers, num_units, block_size, model_config.kv_dim)
        cache_dtype = torch_dtype(kv_cache_dtype or dtype)
        self.kv_cache = torch.zeros(cache_shape, dtype=cache_dtype, device=self.device)
        # The scratch holds one layer's K/V of num_scratch_blocks in pool units a step lends it (runner/metadata.py).
        self.num_scratch_units = (scratch_units(model_config, num_scratch_blocks * block_size, block_size)
                                  if num_scratch_blocks else 0)
        # Decode attention reads K/V in place where our CPU kernel is built for this machine (fp32 or bf16 rows).
        paged_kernel = (self.device.type == "cpu" and {self.dtype, cache_dtype} <= PAGED_KERNEL_DTYPES
                        and cpu_kernels() is not None)
        self.metadata_builder = AttentionMetadataBuilder(
            self.kv_cache, num_scratch_blocks, model_config.hidden_size, self.model.rope, self.dtype, paged_kernel)
        # Built at start-up, not on the first constrained request: the tokenizer view takes about a second.
        self.sampler = Sampler(seed, self.device, model_config.eos_token_ids, logprobs_mode,
                               grammar_compiler=GrammarCompiler.for_model(model_config),
                               vocab_size=model_config.vocab_size)
        # The engine core hands each constrained request's compiled grammar in here (core/grammar_gate.py).
        self.grammars = self.sampler.grammars
        self.decode_group_bytes = default_decode_group_bytes(self.device, paged_kernel)

    @classmethod
    def from_config(cls, config: EngineConfig) -> ModelRunner:
        return cls(config.model, config.cache.num_units, config.cache.block_size, config.dtype, config.device,
                   config.seed, hidden_scratch_tokens=config.cache.hidden_scratch_tokens,
                   logprobs_mode=config.logprobs_mode, kv_cache_dtype=config.cache.dtype,
                   demote_in_place=config.scheduler.demote_in_place,
                   cpu_threads_follow_load=config.cpu_threads_follow_load)

    def _num_scratch_blocks(self, hidden_scratch_tokens: int | None, block_size: int) -> int:
        minimum = min_hidden_scratch_tokens(self.model_config, block_size)
        if hidden_scratch_tokens is None:
            hidden_scratch_tokens = minimum
        if hidden_scratch_tokens < 0 or 0 < hidden_scratch_tokens < minimum:
            raise ValueError(f"hidden_scratch_tokens={hidden_scratch_tokens} cannot hold one request's "
                             f"context (max_model_len {self.model_config.max_model_len}); give 0 (no "
                             f"hidden cache) or at least {minimum}")
        return hidden_scratch_tokens // block_size

    @property
    def hidden_scratch_tokens(self) -> int:
        """Rows of K/V the scratch holds (whole blocks)."""
        return self.metadata_builder.num_scratch_blocks * self.metadata_builder.block_size

    @torch.inference_mode()
    def execute(self, sched_out: SchedulerOutput) -> RunnerOutput:
        start_s = time.perf_counter()
        self.sampler.forget(sched_out.finished_request_ids)
        if sched_out.conversions:  # before the forward: it may reuse the hidden units they read
            try:
                conversions = self.metadata_builder.build_conversions(sched_out.conversions)
                apply_conversions(self.kv_cache, conversions, self.model.attention_layers())
            except Exception as exc:
                raise ConversionFailedError([c.request_id for c in sched_out.conversions]) from exc
        if sched_out.is_empty:
            return RunnerOutput()
        if self.thread_budget is not None:
            torch.set_num_threads(self.thread_budget.next_step_threads())  # unchanged: a no-op
        model_input = self.prepare_inputs(sched_out.scheduled, sched_out.scratch_unit_ids)
        prepared_s = time.perf_counter()
        hidden = self.model(model_input.input_ids, model_input.positions, model_input.attn_metadata)
        logits = self.model.compute_logits(hidden[model_input.logits_indices]) if model_input.sampled else None
        if self.device.type == "cuda":  # the forward's kernels must be done before it is timed
            torch.cuda.synchronize(self.device)
        forwarded_s = time.perf_counter()
        out = self._sample(logits, model_input.sampled) if logits is not None else RunnerOutput()
        for request, first_row in model_input.prompt_rows:
            out.prompt_logprobs[request.request_id] = prompt_logprobs(self.model, hidden, request, first_row)
        out.prepare_s, out.forward_s = prepared_s - start_s, forwarded_s - prepared_s
        out.sample_s = time.perf_counter() - forwarded_s
        out.num_threads = torch.get_num_threads() if self.device.type == "cpu" else 0
        return out

    def _sample(self, logits: torch.Tensor, sampled: list[ScheduledRequest]) -> RunnerOutput:
        """Tokens (and asked-for logprobs) of the sampled rows; if the batch fails, each row alone, so a request
        whose sampling fails (request id -> error) fails by itself."""
        out = RunnerOutput()
        try:
            token_ids, out.logprobs, out.failed = self.sampler(logits, sampled)
            out.sampled_token_ids = {r.request_id: t for r, t in zip(sampled, token_ids)
                                     if r.request_id not in out.failed}
        except Exception:
            for row, request in enumerate(sampled):
                try:
                    token_ids, logprobs, failed = self.sampler(logits[row:row + 1], [request])
                except Exception as exc:
                    out.failed[request.request_id] = f"sampling failed: {type(exc).__name__}: {exc}"
                else:
                    if failed:
                        out.failed.update(failed)
                    else:
                        out.sampled_token_ids[request.request_id] = token_ids[0]
                    out.logprobs.update(logprobs)
        return out

    def prepare_inputs(self, scheduled: list[ScheduledRequest], scratch_unit_ids: Sequence[int] = ()) -> ModelInput:
        """Decodes first (they attend in batched groups: KV ones, then hidden ones), then prefill chunks."""
        ordered = order_for_step(scheduled)
        attn_metadata, positions = self.metadata_builder.build(ordered, self.decode_group_bytes, scratch_unit_ids)
        input_ids = torch.tensor([t for r in ordered for t in r.token_ids], device=self.device)
        row_ends = list(accumulate(r.num_tokens for r in ordered))
        last_rows = [end - 1 for end, r in zip(row_ends, ordered) if r.sample]
        logits_indices = torch.tensor(last_rows, dtype=torch.long, device=self.device)
        sampled = [r for r in ordered if r.sample]
        prompt_rows = [(r, end - r.num_tokens) for end, r in zip(row_ends, ordered) if wants_prompt_logprobs(r)]
        return ModelInput(input_ids, positions, attn_metadata, logits_indices, sampled, prompt_rows)
