"""Hybrid cache on this machine: what recomputing K/V from hidden rows costs per decode step, and whether
holding twice the tokens pays for it at saturation.

1. Decode step latency on the opt-125m and opt-350m shapes (seeded random weights, fp32): a batch of
   --batch-size decodes at each context length, all-KV, all-HIDDEN and half/half, driven straight
   through the ModelRunner with hand-built SchedulerOutputs over a CacheManager (one warm-up step, then
   the median of up to --repeats steps, fewer once a point has taken --max-seconds-per-point). The
   scratch is the engine default (one max_model_len context), in pool units lent as the engine lends them.
2. Saturation throughput (offline LLM API, output tokens/s): --sat-requests requests of --sat-prompt-len
   tokens and --sat-output-len outputs (greedy, ignore_eos) on a budget that holds only half of them as
   KV; FCFS with the hybrid cache off (KV only: queues and preempts), FCFS with "auto" (hidden allowed,
   never chosen by FCFS: the same pool, as the scratch is lent only to hidden rows), FCFS "all-hidden" (everything fits) and
   the adaptive apt policy with "auto" (alpha measured on this CPU).

    APTSERVE_NUM_THREADS=1 .venv/bin/python benchmarks/hybrid_cache.py        # ~30 min on a busy 2-core box
    .venv/bin/python benchmarks/hybrid_cache.py --models opt-125m --contexts 128,256 --batch-size 4 \\
        --sat-requests 4 --sat-output-len 8 --out-dir /tmp/hc                  # smoke test

Writes <out-dir>/hybrid_cache.json and .png.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from aptserve import LLM, SamplingParams  # noqa: E402
from aptserve.cache import CacheKind, CacheManager  # noqa: E402
from aptserve.cache.geometry import (bytes_per_unit, hidden_units_per_block, min_hidden_scratch_tokens,  # noqa: E402
                                     scratch_units)
from aptserve.engine_args import EngineArgs  # noqa: E402
from aptserve.registry import load_model_config, resolve_model  # noqa: E402
from aptserve.runner import ModelRunner  # noqa: E402
from aptserve.sched.output import ScheduledRequest, SchedulerOutput  # noqa: E402
from benchmarks.common import RESULTS_DIR, load_average, write_json  # noqa: E402

BLOCK_SIZE = 16
MIXES = ("all-kv", "all-hidden", "half")
GREEDY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
SATURATION_CONFIGS = (("fcfs", "off"), ("fcfs", "auto"), ("fcfs", "all-hidden"), ("apt", "auto"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="opt-125m,opt-350m")
    parser.add_argument("--contexts", default="128,256,512,1024,2048")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds-per-point", type=float, default=30.0)
    parser.add_argument("--sat-model", default="opt-125m")
    parser.add_argument("--sat-requests", type=int, default=32)
    parser.add_argument("--sat-prompt-len", type=int, default=256)
    parser.add_argument("--sat-output-len", type=int, default=64)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-saturation", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


# --- 1. decode step latency --------------------------------------------------------------------
def decode_batch(manager: CacheManager, context_len: int, kinds: list[CacheKind]) -> list[ScheduledRequest]:
    """One decode per request: rows [0, context_len - 1) cached, the token at context_len - 1 fed."""
    scheduled = []
    for i, kind in enumerate(kinds):
        assert manager.allocate(f"r{i}", kind, context_len)
        scheduled.append(ScheduledRequest(f"r{i}", [100 + i], context_len - 1, kind,
                                          manager.unit_ids(f"r{i}"), True, GREEDY))
    return scheduled


def time_steps(runner: ModelRunner, scheduled: list[ScheduledRequest], repeats: int,
               max_s: float, scratch_unit_ids: tuple[int, ...]) -> list[float]:
    """Wall time of each step after one warm-up (the same step again: nothing advances)."""
    start = time.perf_counter()
    runner.execute(SchedulerOutput(0, scheduled, scratch_unit_ids=scratch_unit_ids))
    warmup_s = time.perf_counter() - start
    if warmup_s > max_s:  # one-time costs are noise at this size: the warm-up is the sample
        return [warmup_s]
    samples, spent = [], 0.0
    while len(samples) < repeats and (not samples or spent < max_s):
        start = time.perf_counter()
        runner.execute(SchedulerOutput(len(samples) + 1, scheduled, scratch_unit_ids=scratch_unit_ids))
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
    return samples


def decode_latency(model: str, contexts: list[int], batch_size: int, repeats: int,
                   max_s: float) -> list[dict]:
    config = load_model_config(resolve_model(model))
    units_per_hidden = hidden_units_per_block(config.hidden_size, config.kv_dim)
    scratch_tokens = min_hidden_scratch_tokens(config, BLOCK_SIZE)
    num_scratch_units = scratch_units(config, scratch_tokens, BLOCK_SIZE)
    # All-KV at the longest context, and the scratch's units besides.
    num_units = batch_size * 2 * math.ceil(max(contexts) / BLOCK_SIZE) + num_scratch_units
    flop_per_row = 2 * config.hidden_size * 2 * config.kv_dim * config.num_layers  # one row, all layers
    runner = ModelRunner(config, num_units, BLOCK_SIZE, "float32", "cpu",
                         hidden_scratch_tokens=scratch_tokens)
    points = []
    for context_len in contexts:
        for mix in MIXES:
            num_hidden = {"all-kv": 0, "all-hidden": batch_size, "half": batch_size // 2}[mix]
            kinds = [CacheKind.HIDDEN] * num_hidden + [CacheKind.KV] * (batch_size - num_hidden)
            manager = CacheManager(num_units, BLOCK_SIZE, units_per_hidden, num_scratch_units=num_scratch_units)
            samples = time_steps(runner, decode_batch(manager, context_len, kinds), repeats, max_s,
                                 manager.scratch_unit_ids)
            points.append({"model": model, "context_len": context_len, "mix": mix,
                           "batch_size": batch_size, "num_hidden": num_hidden,
                           "median_s": statistics.median(samples),
                           "samples_s": samples, "recompute_tokens": num_hidden * context_len,
                           "recompute_gflop": num_hidden * context_len * flop_per_row / 1e9,
                           "cache_units": manager.usage(), "load_average": load_average()})
            print(f"{model} ctx {context_len:5d} {mix:10s} {points[-1]['median_s'] * 1e3:9.1f} ms",
                  flush=True)
    return points


# --- 2. saturation throughput ------------------------------------------------------------------
def saturation(model: str, num_requests: int, prompt_len: int, output_len: int) -> list[dict]:
    config = load_model_config(resolve_model(model))
    blocks_per_request = math.ceil((prompt_len + output_len) / BLOCK_SIZE)
    budget = num_requests * blocks_per_request * 2 * bytes_per_unit(config, BLOCK_SIZE, "float32") // 2
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, config.vocab_size, (prompt_len,), generator=generator).tolist()
               for _ in range(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    results = []
    for policy, hybrid_cache in SATURATION_CONFIGS:
        llm = LLM(model=model, dtype="float32", kv_cache_memory=budget, scheduler=policy,
                  hybrid_cache=hybrid_cache, max_num_seqs=num_requests, block_size=BLOCK_SIZE)
        warmup = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        llm.generate(prompts[:2], warmup, use_tqdm=False)
        peaks = record_peaks(llm)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed_s = time.perf_counter() - start
        num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
        stats = llm.engine.stats()
        results.append({"policy": policy, "hybrid_cache": hybrid_cache, "resolved": llm.engine.hybrid_cache,
                        "elapsed_s": elapsed_s, "output_tokens_per_s": num_output / elapsed_s,
                        "num_output_tokens": num_output, "num_preemptions": stats.num_preemptions,
                        "num_conversions": stats.num_conversions, "num_steps": stats.num_steps,
                        "pool_units": llm.engine.cache.num_units, "load_average": load_average(), **peaks})
        print(f"saturation {policy}/{hybrid_cache}: {results[-1]['output_tokens_per_s']:.1f} tok/s, "
              f"peak running {peaks['peak_running']}, preemptions {stats.num_preemptions}", flush=True)
        del llm
    return results


def record_peaks(llm: LLM) -> dict:
    """Wrap the engine's step to track the most requests running and hidden units held at once."""
    peaks = {"peak_running": 0, "peak_hidden_units": 0}
    step = llm.engine.step

    def recording_step():
        outputs = step()
        peaks["peak_running"] = max(peaks["peak_running"], llm.engine.scheduler.num_running)
        peaks["peak_hidden_units"] = max(peaks["peak_hidden_units"], llm.engine.cache.usage()["hidden"])
        return outputs

    llm.engine.step = recording_step
    return peaks


# --- report --------------------------------------------------------------------------------------
def plot(path: Path, latency: list[dict], sat: list[dict], sat_model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({p["model"] for p in latency})
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5.2 * (len(models) + 1), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for mix in MIXES:
            points = [p for p in latency if p["model"] == model and p["mix"] == mix]
            ax.plot([p["context_len"] for p in points], [p["median_s"] * 1e3 for p in points], "o-",
                    label=mix)
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="decode step (ms)",
               title=f"{model}: batch {points[0]['batch_size']} decodes")
        ax.set_xticks([p["context_len"] for p in points], [str(p["context_len"]) for p in points])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    ax = axes[0][-1]
    if sat:
        labels = [f"{r['policy']}\n{r['hybrid_cache']}" for r in sat]
        bars = ax.bar(labels, [r["output_tokens_per_s"] for r in sat], color=plt.cm.tab10.colors[:len(sat)])
        for bar, r in zip(bars, sat):
            note = (f"{r['output_tokens_per_s']:.1f}\n{r['peak_running']} running\n"
                    f"{r['peak_hidden_units']} hidden units\n{r['num_preemptions']} preempted")
            ax.annotate(note, ha="center", va="bottom", fontsize=7,
                        xy=(bar.get_x() + bar.get_width() / 2, bar.get_height()))
        ax.set(ylabel="output tokens/s", title=f"saturation ({sat_model}): budget fits half the batch as KV")
        ax.set_ylim(0, max(r["output_tokens_per_s"] for r in sat) * 1.45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = load_average()
    contexts = [int(c) for c in args.contexts.split(",")]
    latency = [] if args.skip_latency else [
        point for model in args.models.split(",")
        for point in decode_latency(model, contexts, args.batch_size, args.repeats,
                                    args.max_seconds_per_point)]
    sat = [] if args.skip_saturation else saturation(args.sat_model, args.sat_requests, args.sat_prompt_len,
                                                     args.sat_output_len)
    payload = {"benchmark": "hybrid_cache", "args": {k: str(v) for k, v in vars(args).items()},
               "torch_num_threads": torch.get_num_threads(), "load_average_before": load_before,
               "load_average_after": load_average(), "block_size": BLOCK_SIZE,
               "hidden_scratch_tokens": EngineArgs.hidden_scratch_tokens,
               "decode_latency": latency, "saturation": sat}
    write_json(args.out_dir / "hybrid_cache.json", payload)
    plot(args.out_dir / "hybrid_cache.png", latency, sat, args.sat_model)
    print(f"wrote {args.out_dir / 'hybrid_cache.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
