"""The offline API: `LLM(model=...)` and `.generate()` / `.chat()`, shaped like vLLM's."""
from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from aptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from aptserve.engine import LLMEngine
from aptserve.errors import InvalidRequestError
from aptserve.outputs import RequestOutput
from aptserve.sampling import SamplingParams

DEFAULT_KV_CACHE_MEMORY = 1 << 30

PromptLike = str | list[int]


class LLM:
    def __init__(self, model: str = "default", *, dtype: str = "float32", device: str = "cpu",
                 kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY, scheduler: str = "fcfs",
                 hybrid_cache: str = "auto", max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, max_model_len: int | None = None,
                 block_size: int = 16, seed: int = 0, ttft_slo: float = 1.0, tbt_slo: float = 1.0,
                 alpha: float | None = None) -> None:
        config = EngineConfig(
            model=model, dtype=dtype, device=device, seed=seed, max_model_len=max_model_len,
            cache=CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory,
                              hybrid_cache=hybrid_cache),
            scheduler=SchedulerConfig(policy=scheduler, max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens,
                                      ttft_slo_s=ttft_slo, tbt_slo_s=tbt_slo, alpha_s=alpha))
        self.engine = LLMEngine.from_config(config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptLike | Sequence[PromptLike],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        request_ids = []
        try:
            for prompt, param in zip(prompts, params):
                request_ids.append(self.engine.add_request(prompt, param).req_id)
        except InvalidRequestError:
            for request_id in request_ids:  # all or nothing: the batch was not accepted
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[request_id] for request_id in request_ids]


def _as_prompt_list(prompts) -> list[PromptLike]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single token-id list
    return prompts


def _as_params_list(params, num_prompts: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    params = list(params)
    if len(params) != num_prompts:
        raise InvalidRequestError(f"got {len(params)} sampling params for {num_prompts} prompts")
    return params
