"""The offline API: `LLM(model=...)` and `.generate()` / `.chat()`, shaped like vLLM's."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tqdm.auto import tqdm

from aptserve.engine import LLMEngine
from aptserve.engine_args import EngineArgs
from aptserve.errors import InvalidRequestError
from aptserve.outputs import RequestOutput
from aptserve.sampling import RequestOutputKind, SamplingParams

# Text, token ids, or vLLM's prompt dicts: {"prompt": text} and {"prompt_token_ids": [...]}.
PromptLike = str | list[int] | dict


class LLM:
    def __init__(self, model: str = "default", **kwargs) -> None:
        """`kwargs`: any engine flag by its field name in EngineArgs (dtype, kv_cache_memory, scheduler,
        hybrid_cache, max_num_seqs, ...); an unknown name is a TypeError that lists the known ones."""
        unknown = sorted(set(kwargs) - set(EngineArgs.field_names()))
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; known: {EngineArgs.field_names()}")
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptLike | Sequence[PromptLike],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": [...]});
        outputs come back in prompt order."""
        prompts = [_unwrap(prompt) for prompt in _as_prompt_list(prompts)]
        params = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                  for p in _as_params_list(sampling_params, len(prompts))]
        request_ids = []
        try:
            for prompt, param in zip(prompts, params):
                request_ids.append(self.engine.add_request(prompt, param).request_id)
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
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single token-id list
    return prompts


def _unwrap(prompt: PromptLike) -> str | list[int]:
    """A vLLM prompt dict's text or token ids; InvalidRequestError for a dict with neither (or both)."""
    if not isinstance(prompt, dict):
        return prompt
    keys = set(prompt) & {"prompt", "prompt_token_ids"}
    if len(keys) != 1 or set(prompt) - keys:
        raise InvalidRequestError(f"a prompt dict takes exactly one of 'prompt' or 'prompt_token_ids', got keys "
                                  f"{sorted(prompt)}")
    return prompt[keys.pop()]


def _as_params_list(params, num_prompts: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    params = list(params)
    if len(params) != num_prompts:
        raise InvalidRequestError(f"got {len(params)} sampling params for {num_prompts} prompts")
    return params
