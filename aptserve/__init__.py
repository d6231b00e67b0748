"""aptserve: LLM serving with a hybrid KV/hidden cache and an SLO-aware adaptive scheduler.

`from aptserve import LLM, SamplingParams` loads the engine on first use only, so the pure parts
(aptserve.sched, aptserve.cache, aptserve.bench) import without torch or the engine.
"""
import importlib

_EXPORTS = {
    "LLM": "aptserve.llm",
    "EngineArgs": "aptserve.engine_args",
    "SamplingParams": "aptserve.sampling",
    "RequestOutputKind": "aptserve.sampling",
    "RequestOutput": "aptserve.outputs",
    "CompletionOutput": "aptserve.outputs",
    "InvalidRequestError": "aptserve.errors",
    "UnknownModelError": "aptserve.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aptserve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
