"""The door of the engine: a prompt and its SamplingParams -> token ids and resolved params, or a typed error.

Every prompt is tokenized here, once, and every check of a request against the model and the pool (empty, too
long, token ids outside the vocabulary, more cache than the whole pool) and every default that depends on the
prompt (`max_tokens=None` fills the context, as vLLM does) is decided here, so nothing behind it re-checks them.
It needs the configuration only, so it runs in the front-end process when the engine core has its own.
"""
from __future__ import annotations

import dataclasses

from aptserve.cache.geometry import max_tokens_of_one_request
from aptserve.config import EngineConfig
from aptserve.errors import InvalidRequestError
from aptserve.grammar_compiler import GrammarCompiler
from aptserve.sampling import SamplingParams

# How much a tokenizer's normalizer may shorten text (Unicode composition joins up to ~3 code points into one).
NORMALIZER_SHRINK = 4


@dataclasses.dataclass(frozen=True)
class ProcessedPrompt:
    text: str | None
    token_ids: list[int]
    params: SamplingParams  # max_tokens resolved


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer=None, grammars: GrammarCompiler | None = None) -> None:
        """`grammars`: compiles structured-output constraints to check them (None: such requests are refused)."""
        self.config = config
        self.model_config = config.model
        self.tokenizer = tokenizer
        self.grammars = grammars
        # Once, at start-up: reading the vocabulary takes tens of milliseconds.
        self.max_prompt_chars = self._max_prompt_chars() if tokenizer is not None else 0

    def process(self, prompt: str | list[int], params: SamplingParams) -> ProcessedPrompt:
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenize(prompt) if prompt else []
        else:
            text, token_ids = None, self._ids(prompt)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty; send at least one token")
        self._check_params(params)
        params = self._resolve_params(len(token_ids), params)
        self._check_fits_pool(len(token_ids) + params.max_tokens)
        return ProcessedPrompt(text, token_ids, params)

    def _max_prompt_chars(self) -> int:
        """A text longer than this cannot fit max_model_len tokens: no token covers more characters than the
        longest in the vocabulary (times what a normalizer may shrink text by), so it is refused untokenized."""
        longest = max(map(len, self.tokenizer.get_vocab()), default=1)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        shrink = 1 if backend is not None and backend.normalizer is None else NORMALIZER_SHRINK
        return longest * shrink * self.model_config.max_model_len

    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """The prompt's token ids; InvalidRequestError for text that cannot fit the context or be tokenized."""
        if self.tokenizer is None:
            raise InvalidRequestError("this engine has no tokenizer; send token ids")
        self.check_prompt_chars(len(prompt))
        try:
            prompt.encode()  # JSON may carry lone surrogates; the tokenizer fails on them with a TypeError
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"the prompt is not valid Unicode: {exc.reason} at position {exc.start}") from exc
        try:
            return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"the prompt cannot be tokenized: {exc}") from exc

    def check_prompt_chars(self, num_chars: int, what: str = "the prompt") -> None:
        """InvalidRequestError for text too long for the context, before anyone tokenizes (or renders) it."""
        if num_chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"{what} has {num_chars} characters, more than {self.model_config.max_model_len} tokens (the "
                f"maximum context length) can hold; shorten {what}")

    def check_context_ids(self, token_ids, what: str) -> None:
        """InvalidRequestError unless they are at most a context's worth of ids of this model's vocabulary."""
        if len(token_ids) > self.model_config.max_model_len:
            raise InvalidRequestError(f"{what} has {len(token_ids)} ids; at most {self.model_config.max_model_len} "
                                      "(the maximum context length) are taken")
        self.check_token_ids(token_ids, what)

    def _ids(self, prompt: list[int]) -> list[int]:
        token_ids = list(prompt)
        self.check_token_ids(token_ids, "token ids")
        return token_ids

    def check_token_ids(self, token_ids, what: str) -> None:
        """InvalidRequestError unless every one is an integer id of this model's vocabulary."""
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"{what} must be integers in [0, {vocab})")

    def _check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check without the model: token ids and top_k against the vocabulary."""
        vocab = self.model_config.vocab_size
        if params.top_k > vocab:
            raise InvalidRequestError(f"top_k must be -1, 0 (disabled) or at most the vocabulary size {vocab}, "
                                      f"got {params.top_k}")
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        self.check_token_ids(params.logit_bias or (), "logit_bias keys")
        if params.structured is not None:
            if self.grammars is None:
                raise InvalidRequestError("structured output needs the model's tokenizer; this engine has none")
            self.grammars.compile(params.structured)  # may take seconds: the server calls process() off its loop
        asked = max(params.logprobs or 0, params.prompt_logprobs or 0)
        if asked > self.config.max_logprobs:
            raise InvalidRequestError(f"logprobs asks for {asked} alternatives per token; this server returns at "
                                      f"most {self.config.max_logprobs} (--max-logprobs)")

    def _resolve_params(self, num_prompt_tokens: int, params: SamplingParams) -> SamplingParams:
        max_len = self.model_config.max_model_len
        limit = f"{max_len} tokens"
        if max_tokens_of_one_request(self.config.cache) <= max_len:  # the pool, not the model, sets it
            limit += " (all the cache pool holds of one request; raise kv_cache_memory for more)"
        if num_prompt_tokens >= max_len:
            raise InvalidRequestError(f"the prompt has {num_prompt_tokens} tokens but the maximum context "
                                      f"length is {limit}; shorten the prompt")
        if params.max_tokens is None:
            return dataclasses.replace(params, max_tokens=max_len - num_prompt_tokens)
        if num_prompt_tokens + params.max_tokens > max_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {limit}, but "
                f"{num_prompt_tokens + params.max_tokens} were requested ({num_prompt_tokens} in the prompt, "
                f"{params.max_tokens} in max_tokens); lower max_tokens or the prompt")
        return params

    def _check_fits_pool(self, max_num_tokens: int) -> None:
        """Refuse what the whole pool is not sure to hold (geometry.max_tokens_of_one_request: as KV, or as hidden rows
        where every request is), so that no request can wait forever for memory."""
        fitting = max_tokens_of_one_request(self.config.cache)
        if max_num_tokens > fitting:
            raise InvalidRequestError(
                f"the request needs up to {max_num_tokens} tokens of cache but the pool holds at most {fitting} "
                f"of one request; raise kv_cache_memory or lower max_tokens")
