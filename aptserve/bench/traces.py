"""Every trace by name: `load_trace` over the data-set loaders (datasets.py) and the shared-prefix ones
(shared_prefix.py)."""
from __future__ import annotations

from typing import Any

import numpy as np

from aptserve.bench.datasets import (TraceRequest, sample_humaneval, sample_longbench, sample_sharegpt,
                                     sample_synthetic)
from aptserve.bench.shared_prefix import sample_shared_prefix, sample_sharegpt_multiturn


def load_trace(name: str, tokenizer: Any, num_requests: int, seed: int = 0, **options: Any) -> list[TraceRequest]:
    """A seeded trace of `num_requests` from "sharegpt" | "sharegpt-multiturn" | "shared-prefix" | "humaneval" |
    "longbench" | "synthetic".

    `options` go to the loader: sharegpt (min_len, max_total_len, max_prompt_len), sharegpt-multiturn
    (max_prompt_len, max_output_len), shared-prefix (num_prefixes, prefix_len, prompt_len, output_len), longbench
    (target_prompt_len, min_output_len), synthetic (prompt_len, output_len).
    """
    loaders = {"sharegpt": sample_sharegpt, "sharegpt-multiturn": sample_sharegpt_multiturn,
               "shared-prefix": sample_shared_prefix, "humaneval": sample_humaneval, "longbench": sample_longbench,
               "synthetic": sample_synthetic}
    if name not in loaders:
        raise ValueError(f"unknown trace {name!r}; choose one of {sorted(loaders)}")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    return loaders[name](tokenizer, num_requests, np.random.default_rng(seed), **options)
