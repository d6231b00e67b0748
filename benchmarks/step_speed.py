"""Raw engine speed, aptserve vs vLLM's CPU build on the same model folder: the time of one decode step at 1, 8 and
32 rows, and prefill throughput for one 128-, 512- and 1024-token prompt.

Both are timed the same way, stepping their offline engine (`add_request`, then `step` until done; greedy,
ignore_eos, no prefix cache hits: every call has prompts of its own): a decode step = the median wall time of the
steps in which all N rows decode (after each has its first token; 32 of them), from --decode-context-token prompts
(256: about what served requests attend to), the least median over repeats; prefill = prompt tokens / time to
generate 1 token from one prompt, min over repeats.
vLLM runs in its own venv through benchmarks/_vllm_step_worker.py with every core for its compute threads, in its
default (compiled) mode and with --enforce-eager.

    .venv/bin/python benchmarks/step_speed.py            # ~6 min
    .venv/bin/python benchmarks/step_speed.py --skip-vllm

Writes <out-dir>/step_speed.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks.common import REPO_ROOT, RESULTS_DIR, bar_chart, load_average, write_json  # noqa: E402
from benchmarks._step_speed_common import measure, stepping_run  # noqa: E402
from benchmarks.servers import first_error_line, vllm_env, vllm_python  # noqa: E402

WORKER = REPO_ROOT / "benchmarks" / "_vllm_step_worker.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--decode-rows", default="1,8,32")
    parser.add_argument("--prefill-lens", default="128,512,1024")
    parser.add_argument("--decode-contexts", default="256", help="comma-separated context lengths of the decodes")
    parser.add_argument("--dtype", default="float32", help="both engines' --dtype ('auto': each its own default)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--name", default="step_speed", help="file name of the results")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache-memory", type=int, default=512 << 20)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-python", default=None)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def run_aptserve(args) -> dict:
    from aptserve import LLM

    llm = LLM(model=args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, max_num_seqs=64,
              max_model_len=args.max_model_len)
    return {**measure(aptserve_stepping_run(llm), *figures_args(args)), "dtype": llm.engine.config.dtype}


def aptserve_stepping_run(llm):
    """step_speed's `run` over an aptserve LLM's engine (greedy, ignore_eos)."""
    from aptserve import SamplingParams

    engine = llm.engine

    def add_request(request_id: str, prompt: list[int], max_tokens: int) -> None:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                           request_id=request_id)

    return stepping_run(add_request, engine.step, engine.has_unfinished_requests)


def figures_args(args) -> tuple[list[int], list[int], int, list[int]]:
    return ([int(r) for r in args.decode_rows.split(",")], [int(n) for n in args.prefill_lens.split(",") if n],
            args.repeats, [int(c) for c in args.decode_contexts.split(",")])


def run_vllm(args, model_dir: str, eager: bool) -> dict:
    decode_rows, prefill_lens, repeats, decode_contexts = figures_args(args)
    spec = {"model": model_dir, "kv_cache_memory_bytes": args.kv_cache_memory, "eager": eager,
            "decode_rows": decode_rows, "prefill_lens": prefill_lens, "repeats": repeats,
            "decode_contexts": decode_contexts, "dtype": args.dtype, "max_model_len": args.max_model_len}
    env = {**os.environ, **vllm_env(os.cpu_count() or 1)}
    with tempfile.TemporaryDirectory(prefix="vllm-step-") as tmp:
        spec_path, result_path, log_path = (Path(tmp) / n for n in ("spec.json", "result.json", "vllm.log"))
        spec_path.write_text(json.dumps(spec))
        with open(log_path, "w") as log_file:
            done = subprocess.run([vllm_python(args.vllm_python), str(WORKER), str(spec_path), str(result_path)],
                                  stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=1800, cwd=REPO_ROOT)
        if done.returncode != 0 or not result_path.is_file():
            raise RuntimeError(f"vLLM worker exited {done.returncode}: "
                               + first_error_line(log_path.read_text(errors="replace")))
        return json.loads(result_path.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aptserve.registry import resolve_model

    model_dir = resolve_model(args.model)
    systems = {"aptserve": run_aptserve(args)}
    if not args.skip_vllm:
        for name, eager in (("vllm", False), ("vllm-eager", True)):
            try:
                systems[name] = run_vllm(args, model_dir, eager)
            except Exception as error:  # noqa: BLE001 - recorded, the others still count
                systems[name] = {"error": f"{type(error).__name__}: {error}"}
    for name, result in systems.items():
        print(f"{name}: {json.dumps(result)[:400]}", flush=True)
    payload = {"benchmark": "step_speed", "config": {**vars(args), "model_dir": model_dir}, "systems": systems,
               "load_average_after": load_average()}
    out_dir = Path(args.out_dir)
    write_json(out_dir / f"{args.name}.json", payload)
    ok = {name: r for name, r in systems.items() if "decode" in r}
    labels = [f"{name}\ndecode x{rows}" for name, r in ok.items() for rows in r["decode"]]
    values = [r["decode"][rows]["step_ms"] for r in ok.values() for rows in r["decode"]]
    labels += [f"{name}\nprefill {n}" for name, r in ok.items() for n in r["prefill"]]
    values += [r["prefill"][n]["ms"] for r in ok.values() for n in r["prefill"]]
    bar_chart(out_dir / f"{args.name}.png", labels, values, title=f"decode step and prefill time (ms), {model_dir}",
              ylabel="ms (lower is better)")
    return 0 if len(ok) == len(systems) else 1


if __name__ == "__main__":  # vLLM spawns processes; keep module import side-effect free
    sys.exit(main())
