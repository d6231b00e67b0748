"""Run one offline generate with vLLM's CPU build; called by offline_throughput.py in the .venv-vllm interpreter.

    python _vllm_offline_worker.py SPEC.json RESULT.json

SPEC holds the model folder, the token-id prompts (measured and warm-up), max_tokens, the KV byte budget,
max_num_seqs and repeats. RESULT gets the elapsed seconds of each repeat, output token counts, the token ids
and vLLM's settings.
This file imports only vLLM and the standard library: aptserve is not installed in that venv.
"""
from __future__ import annotations

import json
import sys
import time


def build_llm(spec: dict):
    from vllm import LLM

    return LLM(model=spec["model"], dtype=spec.get("dtype", "float32"), enforce_eager=spec.get("enforce_eager", True),
               gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.3),
               kv_cache_memory_bytes=spec["kv_cache_memory_bytes"], max_num_seqs=spec["max_num_seqs"],
               max_model_len=spec.get("max_model_len"), seed=0)


def timed_generate(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    elapsed_s = time.perf_counter() - start
    return elapsed_s, [list(o.outputs[0].token_ids) for o in outputs]


def scheduler_settings(llm) -> dict:
    """The settings that shape vLLM's batches, for the record (best effort: internals move between versions)."""
    try:
        config = llm.llm_engine.vllm_config
        sched, cache = config.scheduler_config, config.cache_config
        return {"max_num_batched_tokens": sched.max_num_batched_tokens, "max_num_seqs": sched.max_num_seqs,
                "chunked_prefill": getattr(sched, "enable_chunked_prefill", None),
                "prefix_caching": cache.enable_prefix_caching, "block_size": cache.block_size,
                "num_gpu_blocks": cache.num_gpu_blocks}
    except AttributeError as error:
        return {"unavailable": repr(error)}


def main(spec_path: str, result_path: str) -> None:
    import torch
    import vllm

    with open(spec_path) as f:
        spec = json.load(f)
    start = time.perf_counter()
    llm = build_llm(spec)
    load_s = time.perf_counter() - start
    warmup_s, _ = timed_generate(llm, spec["warmup_prompts"], spec["warmup_max_tokens"])
    all_elapsed_s = []
    for _ in range(spec.get("repeats", 1)):
        llm.reset_prefix_cache()  # a repeat must not skip prefill through the prefix cache
        elapsed_s, token_ids = timed_generate(llm, spec["prompts"], spec["max_tokens"])
        all_elapsed_s.append(elapsed_s)
    result = {"all_elapsed_s": all_elapsed_s, "load_s": load_s, "warmup_s": warmup_s,
              "num_output_tokens": sum(len(t) for t in token_ids), "token_ids": token_ids,
              "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
              "torch_num_threads": torch.get_num_threads(), "settings": scheduler_settings(llm)}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running main
    main(sys.argv[1], sys.argv[2])
