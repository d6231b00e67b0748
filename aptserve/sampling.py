"""SamplingParams: what a request asks of the sampler and of the stop checks (vLLM's names and defaults)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from aptserve.errors import InvalidRequestError
from aptserve.structured_output import StructuredOutput

# Below this temperature a request is sampled greedily, as vLLM does: dividing logits by it would overflow.
GREEDY_TEMPERATURE = 1e-5
# Stop conditions are checked on every token of every request: bounded so one request cannot slow the rest.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# Bounds of the OpenAI API (penalties, logit_bias) and of vLLM's checks.
PENALTY_RANGE = (-2.0, 2.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS_ENTRIES = 1024


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request carries (vLLM's names)."""

    CUMULATIVE = 0  # all text and token ids so far, every step
    DELTA = 1  # only what is new since the previous output (streaming)
    FINAL_ONLY = 2  # one output, when the request finishes (offline batches)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    seed: int | None = None
    # None: as many as fit the context (max_model_len less the prompt), resolved when the request comes in.
    max_tokens: int | None = 16
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Logits processing (vLLM's order: min_tokens, logit_bias, penalties, temperature, min_p, top-k / top-p).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages every token of the prompt and output so far
    min_p: float = 0.0
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the request before this many tokens
    logit_bias: dict[int, float] | None = None
    # Log probabilities of each sampled token and of its `logprobs` most likely alternatives (0: the token's only);
    # the same for every prompt token after the first (the model's raw distribution; no prefix cache hit then).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # The text must match this (JSON schema, regex, choice, grammar): tokens that cannot continue it are masked.
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        # Accept lists and a single stop string as the OpenAI API does; store tuples (hashable, frozen).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        max_tokens = self.max_tokens
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise InvalidRequestError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise InvalidRequestError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most "
                                      f"{MAX_STOP_STRING_CHARS} characters each")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} token ids")
        self._validate_processing()

    def _validate_processing(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not PENALTY_RANGE[0] <= getattr(self, name) <= PENALTY_RANGE[1]:
                raise InvalidRequestError(f"{name} must be in [{PENALTY_RANGE[0]}, {PENALTY_RANGE[1]}], "
                                          f"got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 1e4:  # vLLM: > 0; 1e4 keeps logit / penalty finite
            raise InvalidRequestError(f"repetition_penalty must be in (0, 10000], got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise InvalidRequestError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) must be at most max_tokens "
                                      f"({self.max_tokens})")
        bias = self.logit_bias or {}
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidRequestError(f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} entries")
        if any(not LOGIT_BIAS_RANGE[0] <= value <= LOGIT_BIAS_RANGE[1] for value in bias.values()):
            raise InvalidRequestError(f"logit_bias values must be in [{LOGIT_BIAS_RANGE[0]}, "
                                      f"{LOGIT_BIAS_RANGE[1]}]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InvalidRequestError(f"{name} must be an integer >= 0, got {value!r}")

    @property
    def has_penalties(self) -> bool:
        """True when the sampler needs the request's tokens so far."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1
