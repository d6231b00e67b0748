"""aptserve: LLM serving with a hybrid KV/hidden cache and an SLO-aware adaptive scheduler."""
from aptserve.errors import InvalidRequestError, UnknownModelError
from aptserve.llm import LLM
from aptserve.outputs import CompletionOutput, RequestOutput
from aptserve.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "InvalidRequestError",
           "UnknownModelError"]
