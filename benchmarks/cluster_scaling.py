"""Routing at scale, simulated: N replicas of OPT-13B, each on one A100-40GB (the paper's setup), behind each router,
on ShareGPT with Poisson (cv 1) and bursty (cv 4) arrivals. Effective throughput per replica (the highest rate at which
90% of requests meet TTFT 0.25 s and P99 TBT 0.1 s, divided by N), with snapshots polled every 0.5 s; then, at 16
replicas, how the polling period (0.1, 1, 10 s) changes it.

Each cell is `aptserve sim --replicas N --router R --bisect` (the real engine and policies on the roofline model;
requests carry their SLOs), 200 x N requests per rate probed (a shorter trace ends before the queues build).
Writes benchmarks/results/cluster_scaling.{json,png}.

    .venv/bin/python benchmarks/cluster_scaling.py                  # ~25 min with --jobs 2
    .venv/bin/python benchmarks/cluster_scaling.py --replicas 1,4,16,32,64   # hours
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks.common import RESULTS_DIR, write_json  # noqa: E402
from aptserve.cluster.policy import ROUTERS  # noqa: E402

PER_REPLICA_RATES = (0.5, 1, 2, 3, 4, 6, 8)  # req/s per replica swept before bisecting (x N)
STALENESS_REPLICAS = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,4,16")
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--cvs", default="1,4")
    parser.add_argument("--staleness", default="0.5", help="the polling period of the scaling runs (s)")
    parser.add_argument("--staleness-study", default="0.1,1,10", help=f"periods tried at {STALENESS_REPLICAS} "
                        "replicas ('' to skip)")
    parser.add_argument("--staleness-routers", default="apt-slo,pow2", help="the routers of the staleness study")
    parser.add_argument("--requests-per-replica", type=int, default=200)
    parser.add_argument("--max-probes", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def run_cell(cell: tuple, options: argparse.Namespace) -> dict:
    from aptserve.cli import build_parser
    from aptserve.sim.cli import Simulation

    replicas, router, cv, staleness = cell
    rates = ",".join(f"{replicas * r:g}" for r in PER_REPLICA_RATES)
    args = build_parser().parse_args([
        "sim", "--model", "opt-13b", "--gpu", "a100-40gb", "--dataset", "sharegpt", "--max-total-len", "2048",
        "--num-requests", str(options.requests_per_replica * replicas), "--rates", rates, "--bisect",
        "--max-probes", str(options.max_probes), "--cv", str(cv), "--seed", str(options.seed), "--ttft-slo", "0.25",
        "--tbt-slo", "0.1", "--slo-aware", "--replicas", str(replicas), "--router", router,
        "--snapshot-staleness-s", str(staleness), "--no-progress"])
    sim = Simulation.from_args(args)
    result = sim.sweep(args.scheduler, sim.slos(args.scheduler))
    for point in result["points"]:
        point.pop("requests")
    rate = result["effective_throughput"]["paper"]["interpolated_rate"]
    return {"replicas": replicas, "router": router, "cv": cv, "staleness_s": staleness, **result,
            "per_replica": None if rate is None else rate / replicas}


def cells(options: argparse.Namespace) -> list[tuple]:
    routers, cvs = options.routers.split(","), [float(c) for c in options.cvs.split(",")]
    scaling = [(int(n), r, cv, float(options.staleness)) for n in options.replicas.split(",") for r in routers
               for cv in cvs]
    study = [(STALENESS_REPLICAS, r, cv, float(s)) for s in filter(None, options.staleness_study.split(","))
             for r in options.staleness_routers.split(",") for cv in cvs]
    return scaling + [c for c in study if c not in scaling]


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    todo = cells(options)
    results = []
    with ProcessPoolExecutor(options.jobs) as pool, tqdm(total=len(todo), unit="cell") as progress:
        for result in pool.map(run_cell, todo, [options] * len(todo)):
            results.append(result)
            tqdm.write(f"{result['replicas']} x {result['router']}, cv {result['cv']:g}, polled every "
                       f"{result['staleness_s']:g} s: {_fmt(result['per_replica'])} req/s per replica")
            progress.update(1)
    payload = {"benchmark": "cluster_scaling", "config": vars(options), "cells": results,
               "apt_slo_over_pow2": ratios(results, float(options.staleness))}
    out_dir = Path(options.out_dir)
    write_json(out_dir / "cluster_scaling.json", payload)
    plot(out_dir / "cluster_scaling.png", results, float(options.staleness))
    for key, ratio in payload["apt_slo_over_pow2"].items():
        print(f"apt-slo / pow2 at {key}: {_fmt(ratio)}")
    return 0


def ratios(results: list[dict], staleness: float) -> dict:
    """apt-slo's effective throughput per replica over pow2's, per (replicas, cv, polling period)."""
    by_key = {(r["replicas"], r["cv"], r["staleness_s"], r["router"]): r["per_replica"] for r in results}
    out = {}
    for (n, cv, period, router), value in by_key.items():
        base = by_key.get((n, cv, period, "pow2"))
        if router == "apt-slo":
            out[f"{n} replicas, cv {cv:g}, polled every {period:g} s"] = value / base if value and base else None
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(path: Path, results: list[dict], staleness: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cvs = sorted({r["cv"] for r in results})
    fig, axes = plt.subplots(1, len(cvs) + 1, figsize=(6 * (len(cvs) + 1), 4.5))
    for ax, cv in zip(axes, cvs):
        for router in dict.fromkeys(r["router"] for r in results):
            rows = sorted((r["replicas"], r["per_replica"] or 0.0) for r in results
                          if r["router"] == router and r["cv"] == cv and r["staleness_s"] == staleness)
            ax.plot([n for n, _ in rows], [v for _, v in rows], "o-", label=router)
        ax.set(xscale="log", xlabel="replicas", ylabel="effective throughput per replica (req/s)",
               title=f"ShareGPT, cv {cv:g}, polled every {staleness:g} s")
        ax.legend(fontsize=8)
    ax = axes[-1]
    for router in dict.fromkeys(r["router"] for r in results):
        for cv in cvs:
            rows = sorted((r["staleness_s"], r["per_replica"] or 0.0) for r in results if r["router"] == router
                          and r["cv"] == cv and r["replicas"] == STALENESS_REPLICAS)
            ax.plot([s for s, _ in rows], [v for _, v in rows], "o-" if cv == 1 else "s--",
                    label=f"{router}, cv {cv:g}")
    ax.set(xscale="log", xlabel="polling period (s)", ylabel="effective throughput per replica (req/s)",
           title=f"{STALENESS_REPLICAS} replicas: snapshot staleness")
    ax.legend(fontsize=7)
    fig.suptitle("simulated OPT-13B replicas on A100-40GB, TTFT 0.25 s, P99 TBT 0.1 s (90%)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
