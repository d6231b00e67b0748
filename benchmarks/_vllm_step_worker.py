"""step_speed.py's vLLM side, run in the .venv-vllm interpreter: the same figures, timed the same way.

    python _vllm_step_worker.py SPEC.json RESULT.json

This file imports only vLLM, the standard library and _step_speed_common (aptserve is not installed in that venv).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _step_speed_common import measure, stepping_run  # noqa: E402


def main(spec_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams, TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enforce_eager=spec["eager"], gpu_memory_utilization=0.3,
              kv_cache_memory_bytes=spec["kv_cache_memory_bytes"], max_num_seqs=64,
              max_model_len=spec["max_model_len"], seed=0)

    engine = llm.llm_engine

    def add_request(request_id: str, prompt: list[int], max_tokens: int) -> None:
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt),
                           SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))

    run = stepping_run(add_request, engine.step, engine.has_unfinished_requests)
    result = measure(run, spec["decode_rows"], spec["prefill_lens"], spec["repeats"], spec["decode_contexts"])
    result["dtype"] = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running main
    main(sys.argv[1], sys.argv[2])
