"""Tiny random HF models and a minimal scheduler stand-in that drives a ModelRunner step by step."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aptserve.cache import CacheKind, CacheManager
from aptserve.runner import ModelRunner
from aptserve.sampling import SamplingParams
from aptserve.sched.output import CacheConversion, ScheduledRequest, SchedulerOutput

TINY_VOCAB = 256
GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


def save_tiny_llama(path, num_kv_heads: int, tie_word_embeddings: bool) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16, max_position_embeddings=256,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return _save(LlamaForCausalLM, config, path)


def save_tiny_opt(path, do_layer_norm_before: bool, word_embed_proj_dim: int) -> str:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=256, do_layer_norm_before=do_layer_norm_before,
        word_embed_proj_dim=word_embed_proj_dim, init_std=0.1,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    return _save(OPTForCausalLM, config, path)


def _save(model_class, config, path) -> str:
    torch.manual_seed(0)
    model_class(config).save_pretrained(path, safe_serialization=True)
    return str(path)


def assert_matches_hf_greedy(hf_model, prompt: list[int], tokens: list[int]) -> None:
    """Our greedy tokens equal HF's, which may stop early at an EOS (we run with ignore_eos)."""
    out = hf_model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=len(tokens), do_sample=False,
    )
    reference = out[0, len(prompt):].tolist()
    assert tokens[: len(reference)] == reference
    eos_ids = hf_model.generation_config.eos_token_id
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    assert len(reference) == len(tokens) or reference[-1] in eos_ids


@dataclass
class DriverRequest:
    request_id: str
    prompt: list[int]
    max_new_tokens: int
    arrival_step: int = 0
    sampling_params: SamplingParams = GREEDY
    cache_kind: CacheKind = CacheKind.KV
    output: list[int] = field(default_factory=list)
    num_computed: int = 0

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt + self.output


class Driver:
    """Schedules like a chunked-prefill engine: prompts in chunks of `chunk_size`, then one token a step."""

    def __init__(self, runner: ModelRunner, manager: CacheManager, chunk_size: int | None = None) -> None:
        self.runner, self.manager, self.chunk_size = runner, manager, chunk_size
        self.step_id = 0

    def schedule(self, requests: list[DriverRequest]) -> list[ScheduledRequest]:
        scheduled = []
        for request in requests:
            if request.arrival_step > self.step_id or len(request.output) >= request.max_new_tokens:
                continue
            tokens = request.all_tokens
            remaining = len(tokens) - request.num_computed
            num_new = min(remaining, self.chunk_size or remaining)
            end = request.num_computed + num_new
            assert self.manager.allocate(request.request_id, request.cache_kind, end), "test pool too small"
            scheduled.append(ScheduledRequest(
                request.request_id, tokens[request.num_computed:end], request.num_computed, request.cache_kind,
                self.manager.unit_ids(request.request_id), end == len(tokens), request.sampling_params,
            ))
        return scheduled

    def step(self, requests: list[DriverRequest], conversions: list[CacheConversion] | None = None) -> None:
        scheduled = self.schedule(requests)
        output = self.runner.execute(SchedulerOutput(self.step_id, scheduled, conversions=conversions or [],
                                                     scratch_unit_ids=self.manager.scratch_unit_ids))
        assert sorted(output.sampled_token_ids) == sorted(r.request_id for r in scheduled if r.sample)
        by_id = {r.request_id: r for r in requests}
        for item in scheduled:
            by_id[item.request_id].num_computed += item.num_tokens
        for request_id, token_id in output.sampled_token_ids.items():
            by_id[request_id].output.append(token_id)
        self.manager.check_invariants()
        self.step_id += 1

    def run(self, requests: list[DriverRequest]) -> dict[str, list[int]]:
        while any(len(r.output) < r.max_new_tokens for r in requests):
            self.step(requests)
        for request in requests:
            self.manager.free(request.request_id)
        return {r.request_id: r.output for r in requests}
