"""The runner: a scheduler plan -> attention metadata and input tensors -> one forward -> sampled tokens.
It owns the cache tensors (the pool's bookkeeping stays in aptserve.cache)."""
from aptserve.runner.model_runner import ModelRunner

__all__ = ["ModelRunner"]
