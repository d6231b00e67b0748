"""OpenAI request and response schemas (plus vLLM's extra sampling fields and aptserve's per-request SLOs)."""
from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from aptserve.errors import InvalidRequestError
from aptserve.sampling import RequestOutputKind, SamplingParams
from aptserve.server.structured_protocol import ResponseFormat, StructuredOutputsParams, structured_output_of


# Choices of one request (each is a request in the engine): bounded so one request cannot fill the batch alone.
MAX_CHOICES = 64
# Messages and content parts of one chat request: each costs an object to validate and a turn of the template's loop
# (200,000 one-character messages took seconds); counted on the raw JSON first. 4,096 take about 0.1 s.
MAX_CHAT_ITEMS = 4096


class OpenAIBaseModel(BaseModel):
    # Unknown fields are ignored as OpenAI and vLLM do; NaN/inf would poison a whole batch in the sampler.
    # Strict types, as the OpenAI API: "16", true and 2.0 are not integers, 1 is not a boolean.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class SamplingRequest(OpenAIBaseModel):
    """The fields that completions and chat share."""

    model: str | None = None  # None or "": the served model
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as a string, as JSON keys are) -> bias
    # vLLM's extra sampling fields.
    top_k: int = Field(0, ge=-1)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None  # vLLM's
    # aptserve: per-request SLOs in seconds; the server's --ttft-slo / --tbt-slo when absent.
    ttft_slo: float | None = Field(None, gt=0)
    tbt_slo: float | None = Field(None, gt=0)

    def requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    def requested_logprobs(self) -> int | None:
        """Alternatives per token to return log probabilities of (None: no log probabilities)."""
        raise NotImplementedError

    def requested_prompt_logprobs(self) -> int | None:
        return None

    def to_sampling_params(self) -> SamplingParams:
        """SamplingParams for this request (no max_tokens: the engine fills the context); raises
        InvalidRequestError with what to change."""
        output_kind = RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
            max_tokens=self.requested_max_tokens(), stop=self.stop,
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos, output_kind=output_kind,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, min_p=self.min_p, min_tokens=self.min_tokens,
            logit_bias=self._logit_bias(), logprobs=self.requested_logprobs(),
            prompt_logprobs=self.requested_prompt_logprobs(),
            structured=structured_output_of(self.response_format, self.structured_outputs))

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        try:
            return {int(token_id): bias for token_id, bias in self.logit_bias.items()}
        except ValueError as exc:
            raise InvalidRequestError(f"logit_bias keys must be token ids, got {exc}") from exc

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False  # the prompt before the completion, in the text and (with logprobs) in the logprobs

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def requested_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    def prompt_input(self) -> str | list[int]:
        """The one prompt as text or token ids (a one-element batch is unwrapped)."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return prompt
        if len(prompt) != 1:
            raise InvalidRequestError(f"send exactly one prompt per request, got {len(prompt)}")
        return prompt[0]


class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> "ChatMessage":
        # An assistant turn may carry only tool calls; every other role speaks.
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


def _count_chat_items(messages):
    """The raw messages, refused before they are validated if they and their content parts are too many."""
    if isinstance(messages, list):
        num_items = len(messages)
        if num_items <= MAX_CHAT_ITEMS:  # only then are the parts worth counting
            num_items += sum(len(m["content"]) for m in messages
                             if isinstance(m, dict) and isinstance(m.get("content"), list))
        if num_items > MAX_CHAT_ITEMS:
            raise ValueError(f"a request holds at most {MAX_CHAT_ITEMS} messages and content parts, got {num_items}")
    return messages


ChatMessages = Annotated[list[ChatMessage], BeforeValidator(_count_chat_items), Field(min_length=1)]


class ChatCompletionRequest(SamplingRequest):
    messages: ChatMessages
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


# --- responses -----------------------------------------------------------------------------------
class PromptTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0  # served from the prefix cache


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()

    @classmethod
    def of(cls, num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0) -> "UsageInfo":
        return cls(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                   total_tokens=num_prompt_tokens + num_completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached_tokens))


class _Choice(OpenAIBaseModel):
    index: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionLogprobs(OpenAIBaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class _Response(OpenAIBaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class AssistantMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str = ""


class ChatStreamChoice(_Choice):
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "aptserve"
    max_model_len: int


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo

    @classmethod
    def of(cls, message: str, type: str, param: str | None = None,
           code: str | None = None) -> "ErrorResponse":
        return cls(error=ErrorInfo(message=message, type=type, param=param, code=code))
