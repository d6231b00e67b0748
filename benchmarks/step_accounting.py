"""Where served time goes: the engine's step time, phase by phase, next to the inter-token latency clients see,
at 1, 4, 16 and 32 concurrent streams; aptserve (its step phases from /metrics) and vLLM (inter-token latency).

Each concurrency level runs `--requests-per-stream` x C ShareGPT requests (prompts <= --max-prompt-len tokens,
exactly --output-len output tokens, greedy), C at a time (closed loop), on one server at a time; every level gets
prompts of its own, so a prefix cache never replays one. The step phases are the differences of
aptserve:step_phase_seconds over the level (schedule, prepare, forward, sample, update in the engine core; output
in the front end; gap = the core's loop between steps). Served ITL = gaps between token events at the client.

    .venv/bin/python benchmarks/step_accounting.py                       # aptserve and vLLM, ~10 min
    .venv/bin/python benchmarks/step_accounting.py --skip-vllm --variant in-thread=--engine-in-thread
    .venv/bin/python benchmarks/step_accounting.py --checkout before=/tmp/wt --skip-vllm   # another commit's server

Writes <out-dir>/step_accounting.json and .png.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from aptserve.bench.client import run_trace  # noqa: E402
from aptserve.bench.serving import load_bench_trace, trace_stats  # noqa: E402
from benchmarks.common import RESULTS_DIR, load_average, save_figure, write_json  # noqa: E402
from benchmarks.servers import (SERVED_NAME, VLLM, aptserve_command, running_server, scrape,  # noqa: E402
                                settings_lines, vllm_command, vllm_python)

PHASES = ("schedule", "prepare", "forward", "sample", "update", "output", "gap")
ENV_WORD = re.compile(r"^[A-Z][A-Z0-9_]*=")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--requests-per-stream", type=int, default=3)
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    parser.add_argument("--max-prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--kv-cache-memory", type=int, default=None,
                        help="bytes for both servers (default: 32 full-length requests of the model in fp32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=EXTRA_FLAGS: one more aptserve server with these serve flags; words of the form "
                             "VAR=VALUE (upper-case name) go to its environment instead, e.g. "
                             "'bind=OMP_PROC_BIND=close OMP_PLACES=cores' (repeatable)")
    parser.add_argument("--checkout", action="append", default=[],
                        help="NAME=PATH: one more aptserve server run from another checkout (ITL only if it has no "
                             "step accounting)")
    parser.add_argument("--skip-aptserve", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-eager", action="store_true", help="also measure vLLM with --enforce-eager")
    parser.add_argument("--vllm-python", default=None)
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[step_accounting {time.strftime('%H:%M:%S')}] {message}", flush=True)


def servers(args, model_dir: str, kv_bytes: int) -> dict[str, tuple[list[str], dict, Path | None]]:
    max_len = args.max_prompt_len + args.output_len
    common = (kv_bytes, args.max_num_seqs, max_len, args.port, args.threads)
    found: dict[str, tuple[list[str], dict, Path | None]] = {}
    if not args.skip_aptserve:
        found["aptserve"] = (*aptserve_command(args.model, *common), None)
    for variant in args.variant:
        name, _, words = variant.partition("=")
        env_words = [w for w in words.split() if ENV_WORD.match(w)]
        argv, env = aptserve_command(args.model, *common, extra=[w for w in words.split() if w not in env_words])
        found[name] = (argv, {**env, **dict(w.split("=", 1) for w in env_words)}, None)
    for checkout in args.checkout:
        name, _, path = checkout.partition("=")
        found[name] = (*aptserve_command(args.model, *common), Path(path))
    if not args.skip_vllm:
        python = vllm_python(args.vllm_python)
        found[VLLM] = (*vllm_command(python, model_dir, *common), None)
        if args.vllm_eager:
            found[f"{VLLM}-eager"] = (*vllm_command(python, model_dir, *common, eager=True), None)
    return found


def phase_means(before: dict, after: dict) -> dict | None:
    """Mean seconds per step of each phase between two /metrics scrapes (None: the server has no accounting)."""
    def delta(name: str, phase: str) -> float:
        key = (name, (("phase", phase),))
        return after.get(key, 0.0) - before.get(key, 0.0)

    num_steps = delta("aptserve:step_phase_seconds_count", "forward")
    if num_steps <= 0:
        return None
    return {"num_steps": int(num_steps),
            **{f"{phase}_ms": 1e3 * delta("aptserve:step_phase_seconds_sum", phase) / num_steps for phase in PHASES}}


def measure_level(url: str, trace, concurrency: int) -> dict:
    before = scrape(url)
    start_s = time.perf_counter()
    records = asyncio.run(run_trace(url, SERVED_NAME, trace, [0.0] * len(trace), max_concurrency=concurrency,
                                    progress=False))
    duration_s = time.perf_counter() - start_s
    after = scrape(url)
    gaps = np.concatenate([np.diff(r.token_times_s) for r in records if r.completed] or [np.zeros(0)])
    ttfts = [r.first_token_s - r.send_s for r in records if r.completed]
    num_tokens = sum(r.output_len for r in records if r.completed)
    result = {"concurrency": concurrency, "num_requests": len(trace), "failed": sum(not r.completed for r in records),
              "itl_mean_ms": 1e3 * float(gaps.mean()) if gaps.size else None,
              "itl_p50_ms": 1e3 * float(np.median(gaps)) if gaps.size else None,
              "itl_p99_ms": 1e3 * float(np.percentile(gaps, 99)) if gaps.size else None,
              "ttft_mean_s": float(np.mean(ttfts)) if ttfts else None,
              "output_tokens_per_s": num_tokens / duration_s, "duration_s": duration_s}
    steps = phase_means(before, after)
    if steps is not None:
        result["step"] = steps
        result["step_ms"] = sum(steps[f"{phase}_ms"] for phase in PHASES if phase != "output")
    return result


def run_server(args, name: str, argv: list[str], env: dict, cwd: Path | None, traces: dict, warmup,
               log_dir: Path) -> dict:
    log(f"starting {name}: {' '.join(argv)}")
    result = {"command": argv, "env": env, "cwd": str(cwd) if cwd else None, "load_average_before": load_average()}
    kwargs = {"cwd": cwd} if cwd else {}
    try:
        with running_server(name, argv, env, log_dir, args.port, args.startup_timeout, **kwargs) as (url, startup_s):
            result["startup_s"] = round(startup_s, 1)
            asyncio.run(run_trace(url, SERVED_NAME, warmup, [0.0] * len(warmup), max_concurrency=4, progress=False))
            result["levels"] = []
            for concurrency, trace in traces.items():
                level = measure_level(url, trace, concurrency)
                result["levels"].append(level)
                log(f"{name} x{concurrency}: ITL mean {level['itl_mean_ms']:.1f} ms, engine step "
                    f"{level.get('step_ms', float('nan')):.1f} ms, {level['output_tokens_per_s']:.0f} tok/s")
        result["settings_log_lines"] = settings_lines(log_dir / f"{name}.log")
    except Exception as error:  # noqa: BLE001 - recorded, the other servers still run
        result["error"] = f"{type(error).__name__}: {error}"
        log(f"{name} failed: {result['error'][:1000]}")
    result["load_average_after"] = load_average()
    return result


def plot(path: Path, payload: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    results = {name: r for name, r in payload["servers"].items() if "levels" in r}
    for name, result in results.items():
        levels = result["levels"]
        concurrency = [level["concurrency"] for level in levels]
        left.plot(concurrency, [level["itl_mean_ms"] for level in levels], marker="o", label=f"{name} served ITL")
        if all("step_ms" in level for level in levels):
            left.plot(concurrency, [level["step_ms"] for level in levels], marker="x", linestyle="--",
                      label=f"{name} engine step")
    left.set(xscale="log", xlabel="concurrent streams", ylabel="ms", title="mean inter-token latency vs step time")
    left.set_xticks(payload["config"]["concurrency_levels"], payload["config"]["concurrency_levels"])
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    with_steps = [(name, r) for name, r in results.items() if all("step" in level for level in r["levels"])]
    labels, bottoms = [], None
    for name, result in with_steps:
        labels += [f"{name}\nx{level['concurrency']}" for level in result["levels"]]
    bottoms = np.zeros(len(labels))
    for phase in PHASES:
        values = np.array([level["step"][f"{phase}_ms"] for _, r in with_steps for level in r["levels"]])
        right.bar(range(len(labels)), values, bottom=bottoms, label=phase)
        bottoms += values
    right.set_xticks(range(len(labels)), labels, fontsize=7)
    right.set(ylabel="ms per step", title="engine step by phase (output: front end)")
    right.legend(fontsize=8)
    save_figure(fig, path, payload["title"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aptserve.registry import load_tokenizer, resolve_model

    from benchmarks.common import fp32_kv_bytes_per_token

    model_dir = resolve_model(args.model)
    levels = [int(c) for c in args.concurrency.split(",")]
    sizes = [max(args.min_requests, args.requests_per_stream * c) for c in levels]
    pool = load_bench_trace("sharegpt", load_tokenizer(model_dir), sum(sizes) + 8, args.seed,
                            max_prompt_len=args.max_prompt_len)
    pool = [dataclasses.replace(r, output_len=args.output_len) for r in pool]
    warmup, pool = pool[:8], pool[8:]
    traces, start = {}, 0
    for concurrency, size in zip(levels, sizes):
        traces[concurrency], start = pool[start:start + size], start + size
    max_len = args.max_prompt_len + args.output_len
    kv_bytes = args.kv_cache_memory or args.max_num_seqs * max_len * fp32_kv_bytes_per_token(model_dir)
    results = {}
    with tempfile.TemporaryDirectory(prefix="step-accounting-") as log_dir:
        for name, (argv_, env, cwd) in servers(args, model_dir, kv_bytes).items():
            results[name] = run_server(args, name, argv_, env, cwd, traces, warmup, Path(log_dir))
    payload = {"benchmark": "step_accounting",
               "config": {**vars(args), "model_dir": model_dir, "kv_cache_memory_bytes": kv_bytes,
                          "concurrency_levels": levels, "requests_per_level": sizes},
               "trace": {str(c): trace_stats(t) for c, t in traces.items()}, "servers": results,
               "title": (f"ShareGPT prompts <= {args.max_prompt_len}, {args.output_len} output tokens, closed loop; "
                         f"KV {kv_bytes / 2**20:.0f} MiB, max-num-seqs {args.max_num_seqs}, {args.threads} threads")}
    out_dir = Path(args.out_dir)
    json_path = write_json(out_dir / "step_accounting.json", payload)
    plot(out_dir / "step_accounting.png", payload)
    log(f"wrote {json_path}")
    return 0 if all("levels" in r for r in results.values()) else 1


if __name__ == "__main__":  # vLLM spawns processes; keep module import side-effect free
    sys.exit(main())
