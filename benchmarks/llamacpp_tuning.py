"""A/B of llama-server's settings at 16 concurrent streams: is a slow llama.cpp peer llama.cpp, or its setup?

The issue's first try (16 slots, a unified f32 KV pool, -fa on, 2 threads, llama.cpp's defaults otherwise: --poll
50, -b 2048, -ub 512) is the baseline; each variant changes one factor (threads, polling, flash attention, KV type,
batch sizes, slots, unified vs split KV, CPU placement, weight type). Every configuration gets a server of its own
(started, warmed up, measured, stopped), the same KV bytes and the same synthetic requests: `--streams` clients send
distinct token-id prompts back to back (all offsets 0, max_concurrency = streams, as served_ab.py), greedy,
`ignore_eos`. Output lengths are spread over 0.5-1.5x --output-len (fixed per request), so that after the first
wave the streams finish apart and each new prompt's prefill shares steps with the others' decodes, as in serving:
that is where the batch sizes matter. Reported: mean TPOT (TTFT excluded) and ITL (mean, p50, p99), mean TTFT,
output tok/s, and the other processes' share of the CPUs while it ran (`disturbed` above 10%). Then the best setting of each factor that keeps
the other servers' numerics (f32 weights and KV) is combined into `tuned` and measured, and `tuned-low-precision`
adds the weight and KV types that helped. aptserve on the same trace, KV bytes and cores is the reference row
(--references aptserve,vllm adds vLLM).

    .venv/bin/python benchmarks/llamacpp_tuning.py                                   # ~10 min on 2 idle cores
    .venv/bin/python benchmarks/llamacpp_tuning.py --only baseline,poll-0 --requests-per-stream 1 \\
        --output-len 16 --references '' --out-dir /tmp/lt                             # smoke (~1 min)

Writes <out-dir>/llamacpp_tuning.json and .png.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks._llamacpp import parse_flags, prepare_peer, settings_record  # noqa: E402
from benchmarks.common import (RESULTS_DIR, bar_chart, cpu_snapshot, fp32_kv_bytes_per_token,  # noqa: E402
                               other_cpu_fraction, wait_until_idle, write_json)
from benchmarks.served_ab import trace  # noqa: E402
from benchmarks.servers import (SERVED_DTYPES, SERVED_NAME, aptserve_command, llamacpp_command,  # noqa: E402
                                running_server, served_dtype, settings_lines, vllm_command, vllm_python)

from aptserve.bench.client import run_trace  # noqa: E402
from aptserve.bench.metrics import request_metrics  # noqa: E402

# The first, untuned try; the variants change one factor each (name: factor, flags over the baseline).
BASELINE_FLAGS = "-np 16 -kvu -fa on -t 2 --poll 50 -b 2048 -ub 512 --kv-type f32 --weights f32 --cpu-strict 0"
VARIANTS = {
    "threads-1": ("threads", "-t 1"),
    "poll-0": ("poll", "--poll 0"),
    "poll-100": ("poll", "--poll 100"),
    "fa-off": ("flash_attn", "-fa off"),
    "batch-512": ("batch", "-b 512 -ub 512"),
    "batch-128": ("batch", "-b 128 -ub 128"),
    "slots-32": ("slots", "-np 32"),
    "split-kv": ("unified_kv", "-no-kvu"),
    "strict-cpu": ("placement", "--cpu-strict 1"),
    "kv-f16": ("kv_type", "--kv-type f16"),
    "kv-bf16": ("kv_type", "--kv-type bf16"),
    "weights-bf16": ("weights", "--weights bf16"),
    "weights-f16": ("weights", "--weights f16"),
}
# Factors that change what is computed, not how: kept out of `tuned`, which the other servers' f32 faces.
PRECISION_FACTORS = ("kv_type", "weights")
BETTER_BY = 0.03  # a variant must cut mean TPOT by this fraction to count as better (run-to-run noise)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=40, help="mean; each request 0.5-1.5x this")
    parser.add_argument("--threads", type=int, default=2, help="cores of each server")
    parser.add_argument("--kv-cache-memory", type=int, default=None,
                        help="KV bytes of every server (default: 32 requests of the longest prompt + output at "
                             "fp32, serve_compare's rule at max-num-seqs 32, so 32 split slots hold them too)")
    parser.add_argument("--base-flags", default=BASELINE_FLAGS, help="llama-server settings of the baseline")
    parser.add_argument("--only", default=None,
                        help="comma-separated configurations to run (baseline and variant names); no tuned rows")
    parser.add_argument("--references", default="aptserve", help="comma-separated: aptserve, vllm; empty: none")
    parser.add_argument("--reference-dtype", default="float32", choices=SERVED_DTYPES,
                        help="the references' --dtype; 'default': no flag (each server's own choice)")
    parser.add_argument("--repeats", type=int, default=1, help="run every configuration this many times")
    parser.add_argument("--max-tries", type=int, default=3,
                        help="measure a configuration again while other processes disturbed it")
    parser.add_argument("--wait-idle-s", type=float, default=120.0,
                        help="before each configuration, wait up to this long for other processes to go quiet")
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--model", default="default")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--name", default="llamacpp_tuning")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[llamacpp_tuning {time.strftime('%H:%M:%S')}] {message}", flush=True)


def staggered_trace(args: argparse.Namespace) -> list:
    """served_ab's distinct token-id prompts, request i producing output_len x (0.5 + frac(i x golden ratio)) tokens:
    the same requests for every configuration, ending at scattered times."""
    requests = trace(args.streams * args.requests_per_stream, args.prompt_len, args.output_len)
    return [dataclasses.replace(r, output_len=max(2, round(args.output_len * (0.5 + (i * 0.6180339887) % 1.0))))
            for i, r in enumerate(requests)]


def measure(url: str, args: argparse.Namespace) -> dict:
    """The trace at `streams` concurrent streams; per-request TPOT, every inter-token gap, output tok/s."""
    requests = staggered_trace(args)
    num_requests = len(requests)
    start_s = time.perf_counter()
    records = asyncio.run(run_trace(url, SERVED_NAME, requests, [0.0] * num_requests, max_concurrency=args.streams,
                                    progress=False, send_token_ids=True, timeout_s=600))
    elapsed_s = time.perf_counter() - start_s
    metrics = [request_metrics(r) for r in records if r.completed]
    gaps = sorted(gap for m in metrics for gap in m.itl_s)
    if not gaps:
        return {"num_requests": num_requests, "num_failed": num_requests,
                "errors": sorted({r.error for r in records if r.error})[:3]}
    return {"num_requests": num_requests, "num_failed": num_requests - len(metrics),
            "errors": sorted({r.error for r in records if r.error})[:3],
            "tpot_mean_ms": 1e3 * statistics.fmean(m.mean_tpot_s for m in metrics),
            "itl_mean_ms": 1e3 * statistics.fmean(gaps), "itl_p50_ms": 1e3 * gaps[len(gaps) // 2],
            "itl_p99_ms": 1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
            "ttft_mean_ms": 1e3 * statistics.fmean(m.ttft_s for m in metrics),
            "output_tok_s": sum(r.output_len for r in records if r.completed) / elapsed_s,
            "elapsed_s": elapsed_s}


def warm_up(url: str, args: argparse.Namespace) -> None:
    """First allocations and kernels' first calls, on prompts the measured ones do not share (no prefix hits)."""
    num_measured = args.streams * args.requests_per_stream
    requests = trace(num_measured + 4, args.prompt_len, 8)[-4:]
    asyncio.run(run_trace(url, SERVED_NAME, requests, [0.0] * 4, max_concurrency=4, progress=False,
                          send_token_ids=True))


def run_config(name: str, argv: list[str], env: dict, args: argparse.Namespace, log_dir: Path) -> dict:
    """One configuration, measured again (up to --max-tries) while other processes took over 10% of the CPUs:
    on 2 cores a busy neighbour stalls every thread barrier, and the figure says nothing about the settings."""
    for attempt in range(1, args.max_tries + 1):
        row = run_once(name, argv, env, args, log_dir) | {"attempts": attempt}
        if not row["disturbed"] or "error" in row:
            break
    return row


def run_once(name: str, argv: list[str], env: dict, args: argparse.Namespace, log_dir: Path) -> dict:
    busy_before = wait_until_idle(0.1, args.wait_idle_s, log)
    before = cpu_snapshot()
    row = {"name": name, "command": argv, "env": env, "other_cpu_before": busy_before}
    try:
        with running_server(name, argv, env, log_dir, args.port, timeout_s=300) as (url, startup_s):
            warm_up(url, args)
            row |= {"startup_s": round(startup_s, 1), **measure(url, args)}
        row["settings_log_lines"] = settings_lines(log_dir / f"{name}.log")
    except Exception as error:  # noqa: BLE001 - recorded, the other configurations still run
        row["error"] = f"{type(error).__name__}: {error}"[:2000]
    row["other_cpu_during"] = other_cpu_fraction(before, cpu_snapshot())
    row["disturbed"] = row["other_cpu_during"] > 0.1
    log(f"{name}: " + (row.get("error") or f"TPOT {row['tpot_mean_ms']:.1f} ms, ITL {row['itl_mean_ms']:.1f} ms "
                       f"(p99 {row['itl_p99_ms']:.0f}), {row['output_tok_s']:.0f} tok/s, failed {row['num_failed']}, "
                       f"others {row['other_cpu_during']:.0%}"))
    return row


class LlamaCppRunner:
    """Runs llama-server configurations (flags over the baseline) against one model, KV budget and trace; GGUFs
    and the CPU backend are prepared once per weight type."""

    def __init__(self, args: argparse.Namespace, model_dir: str, kv_bytes: int, log_dir: Path):
        self.args, self.model_dir, self.kv_bytes, self.log_dir = args, model_dir, kv_bytes, log_dir
        self.base = parse_flags(args.base_flags)
        self.peers = {}

    def peer(self, weights: str):
        if weights not in self.peers:
            self.peers[weights] = prepare_peer(self.model_dir, parse_flags(f"--weights {weights}", self.base),
                                               self.args.port)
        return self.peers[weights]

    def run(self, name: str, flags: str) -> dict:
        settings = parse_flags(flags, self.base)
        record = {"flags": flags, "settings": settings_record(settings)}
        try:
            peer = self.peer(settings.weights)
            argv, env = llamacpp_command(peer.server, str(peer.gguf), self.model_dir, self.kv_bytes,
                                         settings.slots or self.args.streams, max_model_len(self.args),
                                         self.args.port, self.args.threads, settings, peer.cpu_backend)
        except (RuntimeError, ValueError, OSError) as error:
            log(f"{name}: not run: {error}")
            return record | {"name": name, "error": f"{type(error).__name__}: {error}"}
        return record | {"cpu_backend": peer.cpu_backend, "cpu_backend_probes": peer.probes,
                         **run_config(name, argv, env, self.args, self.log_dir)}


def max_model_len(args: argparse.Namespace) -> int:
    return args.prompt_len + max(r.output_len for r in staggered_trace(args))


def reference_row(name: str, args: argparse.Namespace, model_dir: str, kv_bytes: int, log_dir: Path) -> dict:
    common = (kv_bytes, args.streams, max_model_len(args), args.port, args.threads)
    try:
        dtype = served_dtype(args.reference_dtype)
        argv, env = (aptserve_command(args.model, *common, dtype=dtype) if name == "aptserve"
                     else vllm_command(vllm_python(), model_dir, *common, dtype=dtype))
    except RuntimeError as error:
        return {"name": name, "error": str(error)}
    return run_config(name, argv, env, args, log_dir)


def combined_flags(rows: dict[str, dict], factors: tuple[str, ...] | None = None) -> tuple[str, dict]:
    """Per factor, the variant with the lowest mean TPOT if it beats the baseline by BETTER_BY; their flags joined
    (factors: which ones; None = all but the precision ones)."""
    baseline = rows["baseline"].get("tpot_mean_ms")
    chosen = {}
    for name, (factor, flags) in VARIANTS.items():
        tpot = rows.get(name, {}).get("tpot_mean_ms")
        if baseline is None or tpot is None or tpot > (1 - BETTER_BY) * baseline:
            continue
        if (factors is None and factor in PRECISION_FACTORS) or (factors is not None and factor not in factors):
            continue
        if factor not in chosen or tpot < rows[chosen[factor]]["tpot_mean_ms"]:
            chosen[factor] = name
    return " ".join(VARIANTS[name][1] for name in chosen.values()), chosen


def average_rows(runs: list[dict]) -> dict:
    """One row from its repeats: the figures averaged, each run's TPOT kept."""
    row = dict(runs[-1])
    measured = [run for run in runs if "tpot_mean_ms" in run]
    for key in ("tpot_mean_ms", "itl_mean_ms", "itl_p50_ms", "itl_p99_ms", "ttft_mean_ms", "output_tok_s"):
        if measured:
            row[key] = statistics.fmean(run[key] for run in measured)
    row["tpot_mean_ms_each_run"] = [round(run.get("tpot_mean_ms", float("nan")), 1) for run in runs]
    return row


def plot(rows: dict[str, dict], path: Path, args: argparse.Namespace, kv_bytes: int) -> None:
    measured = {name: row for name, row in rows.items() if "tpot_mean_ms" in row}
    bar_chart(path, list(measured), [row["tpot_mean_ms"] for row in measured.values()],
              annotations=[f"{row['output_tok_s']:.0f} tok/s" for row in measured.values()],
              title=f"llama-server settings, {args.streams} streams x {args.requests_per_stream} requests "
                    f"({args.prompt_len}-token prompts, ~{args.output_len} tokens), KV {kv_bytes / 2**20:.0f} MiB, "
                    f"{args.threads} cores: mean TPOT (lower is better)",
              ylabel="mean TPOT (ms)",
              footnote="baseline: the issue's first try (" + args.base_flags + "); each variant changes one "
                       "factor; tuned = the better settings combined (f32 weights and KV)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aptserve.registry import resolve_model

    model_dir = resolve_model(args.model)
    kv_bytes = args.kv_cache_memory or 32 * max_model_len(args) * fp32_kv_bytes_per_token(model_dir)
    configs = {"baseline": "", **{name: flags for name, (_, flags) in VARIANTS.items()}}
    if args.only:
        configs = {name: configs[name] for name in args.only.split(",") if name in configs}
    references = [name for name in args.references.split(",") if name]
    log(f"model {model_dir}; KV {kv_bytes / 2**20:.0f} MiB; {len(configs)} configurations x {args.repeats}")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="llamacpp-tuning-") as log_dir:
        runner = LlamaCppRunner(args, model_dir, kv_bytes, Path(log_dir))
        for repeat in range(args.repeats):
            order = list(configs) if repeat % 2 == 0 else list(reversed(configs))  # drift falls on all alike
            for name in order:
                runs.setdefault(name, []).append(runner.run(name, configs[name]))
        rows = {name: average_rows(name_runs) for name, name_runs in runs.items()}
        chosen = {}
        if not args.only and "tpot_mean_ms" in rows["baseline"]:
            tuned, chosen["tuned"] = combined_flags(rows)
            precision, chosen["tuned-low-precision"] = combined_flags(rows, PRECISION_FACTORS)
            rows["tuned"] = runner.run("tuned", tuned)
            if precision:
                rows["tuned-low-precision"] = runner.run("tuned-low-precision", f"{tuned} {precision}")
        for name in references:
            rows[name] = reference_row(name, args, model_dir, kv_bytes, Path(log_dir))
    out_dir = Path(args.out_dir)
    summary = {name: {key: row.get(key) for key in ("tpot_mean_ms", "itl_mean_ms", "itl_p99_ms", "ttft_mean_ms",
                                                    "output_tok_s", "num_failed", "other_cpu_during", "disturbed",
                                                    "error") if key in row}
               for name, row in rows.items()}
    write_json(out_dir / f"{args.name}.json", {
        "benchmark": "llamacpp_tuning", "config": {**vars(args), "model_dir": model_dir, "kv_cache_memory_bytes":
                                                   kv_bytes, "baseline_settings": settings_record(
                                                       parse_flags(args.base_flags))},
        "variants": {name: {"factor": factor, "flags": flags} for name, (factor, flags) in VARIANTS.items()},
        "chosen": chosen, "summary": summary, "rows": rows})
    plot(rows, out_dir / f"{args.name}.png", args, kv_bytes)
    for name, row in summary.items():
        log(f"{name}: {row}")
    return 0 if all("error" not in row for row in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
