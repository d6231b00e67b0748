"""Served A/B of two revisions of aptserve: inter-token latency at 1, 16 and 32 concurrent streams, in one run.

Each revision is served from its own git worktree (the same venv; `python -m aptserve.cli serve` with that tree on
PYTHONPATH), one at a time, in the order A B B A A B ... (--rounds), so a steady drift in the machine's speed falls on
both alike. At each concurrency, `streams` clients send requests back to back (greedy, fixed prompt and output
lengths; at least --min-requests in all), and every gap between two token events of a request is one ITL sample;
TTFT and output tok/s come along.

    .venv/bin/python benchmarks/served_ab.py --base HEAD~3 --candidate WORKTREE   # ~10 min
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks.common import REPO_ROOT, RESULTS_DIR, wait_until_idle, write_json  # noqa: E402
from benchmarks.servers import aptserve_command, running_server  # noqa: E402

from aptserve.bench.client import run_trace  # noqa: E402
from aptserve.bench.datasets import TraceRequest  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision of A")
    parser.add_argument("--candidate", default="WORKTREE", help="git revision of B, or WORKTREE (this checkout)")
    parser.add_argument("--streams", default="1,16,32")
    parser.add_argument("--requests-per-stream", type=int, default=3)
    parser.add_argument("--min-requests", type=int, default=12, help="per concurrency, at 1 stream too")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="A and B this many times each (ABBA order)")
    parser.add_argument("--kv-cache-memory", default="512M")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=8301)
    parser.add_argument("--out", default=str(RESULTS_DIR / "served_ab.json"))
    parser.add_argument("--plot", default=str(RESULTS_DIR / "served_ab.png"))
    return parser.parse_args(argv)


def checkout(revision: str, into: Path) -> Path:
    """A worktree of `revision` (the checkout itself for WORKTREE)."""
    if revision == "WORKTREE":
        return REPO_ROOT
    subprocess.run(["git", "worktree", "add", "--detach", str(into), revision], cwd=REPO_ROOT, check=True,
                   capture_output=True)
    return into


def trace(num_requests: int, prompt_len: int, output_len: int) -> list[TraceRequest]:
    # Distinct token-id prompts (no prefix cache hits between them), each exactly prompt_len tokens.
    return [TraceRequest(prompt="", prompt_len=prompt_len, output_len=output_len,
                         prompt_token_ids=[1000 + (i * 7919 + j * 104729) % 40000 for j in range(prompt_len)])
            for i in range(num_requests)]


def measure(base_url: str, streams: int, args: argparse.Namespace) -> dict:
    requests = trace(max(streams * args.requests_per_stream, args.min_requests), args.prompt_len, args.output_len)
    start_s = time.perf_counter()
    records = asyncio.run(run_trace(base_url, "default", requests, [0.0] * len(requests), max_concurrency=streams,
                                    progress=False, send_token_ids=True))
    elapsed_s = time.perf_counter() - start_s
    failed = [r.error for r in records if not r.ok]
    gaps = [b - a for r in records if r.ok for a, b in zip(r.token_times_s, r.token_times_s[1:])]
    ttfts = [r.first_token_s - r.send_s for r in records if r.ok]
    gaps.sort()
    return {"streams": streams, "num_requests": len(records), "num_failed": len(failed), "errors": failed[:3],
            "itl_mean_ms": 1e3 * statistics.fmean(gaps), "itl_p50_ms": 1e3 * gaps[len(gaps) // 2],
            "itl_p99_ms": 1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
            "ttft_mean_ms": 1e3 * statistics.fmean(ttfts),
            "output_tok_s": sum(len(r.token_times_s) for r in records if r.ok) / elapsed_s}


def serve_and_measure(name: str, tree: Path, args: argparse.Namespace, log_dir: Path) -> list[dict]:
    argv, env = aptserve_command("default", args.kv_cache_memory, 32, args.prompt_len + args.output_len + 64,
                                 args.port, args.threads)
    env = {**env, "PYTHONPATH": str(tree)}
    with running_server(name, argv, env, log_dir, args.port, timeout_s=300, cwd=tree) as (base_url, _):
        measure(base_url, 4, args)  # warm-up: first-step allocations, the kernels' first calls
        return [measure(base_url, int(s), args) for s in args.streams.split(",")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="aptserve-ab-"))
    trees = {"A": checkout(args.base, work / "A"), "B": checkout(args.candidate, work / "B")}
    runs: dict[str, list[list[dict]]] = {"A": [], "B": []}
    try:
        for round_index in range(args.rounds):
            for name in ("A", "B") if round_index % 2 == 0 else ("B", "A"):
                tree = trees[name]
                busy = wait_until_idle(0.1, 120)
                print(f"round {round_index + 1}: {name} (others busy {busy:.0%})", flush=True)
                runs[name].append(serve_and_measure(f"{name}{round_index}", tree, args, work))
                print(runs[name][-1], flush=True)
    finally:
        for tree in trees.values():
            if tree != REPO_ROOT:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO_ROOT,
                               capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(runs, args)
    write_json(args.out, {"benchmark": "served_ab", "config": vars(args), "runs": runs, "summary": summary})
    plot(summary, args)
    print(summary)
    return 0


def summarize(runs: dict[str, list[list[dict]]], args: argparse.Namespace) -> list[dict]:
    """Per concurrency: each side's ITL mean and p99 averaged over rounds, and B over A."""
    rows = []
    for i, streams in enumerate(args.streams.split(",")):
        row = {"streams": int(streams)}
        for name in ("A", "B"):
            for key in ("itl_mean_ms", "itl_p99_ms", "ttft_mean_ms", "output_tok_s"):
                row[f"{name}_{key}"] = statistics.fmean(r[i][key] for r in runs[name])
            row[f"{name}_itl_mean_ms_each_run"] = [round(r[i]["itl_mean_ms"], 1) for r in runs[name]]
        row["itl_mean_ratio_b_over_a"] = row["B_itl_mean_ms"] / row["A_itl_mean_ms"]
        rows.append(row)
    return rows


def plot(summary: list[dict], args: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    streams = [row["streams"] for row in summary]
    width = 0.35
    for offset, name, label in ((-width / 2, "A", f"A {args.base}"), (width / 2, "B", f"B {args.candidate}")):
        ax.bar([i + offset for i in range(len(streams))], [row[f"{name}_itl_mean_ms"] for row in summary], width,
               label=label)
    ax.set_xticks(range(len(streams)), [f"{s} streams" for s in streams])
    ax.set_ylabel("mean inter-token latency (ms)")
    ax.set_title(f"served A/B, default model: {args.prompt_len}-token prompts, {args.output_len} tokens each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
