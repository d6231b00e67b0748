"""What a scheduling step costs as the queue grows, per policy, before and after a change (issue 25, item 5).

1. Scheduling time per step (Scheduler.schedule alone) with 200 / 2,000 / 4,096 / 10,000 requests waiting, on the
   simulator's engine (the real scheduler and pool; no model): the opt-125m shape (MHA, so the apt policies price
   the hidden cache), --max-num-seqs 8, a 1 GiB pool, prompts of 16-512 tokens, max_tokens 4 (the issue's served
   setting), arrivals spread over the last 5 s so some requests are past their SLO; the queue is topped up as
   requests finish so it stays at its length.
2. For the apt policies of a checkout that bounds the greedy's candidates, on a second pass over the same trace
   (not timed): on every step, the plan with the bound and without it (every waiting request priced), as far as a
   step can apply it (the upgrades and the first max_num_seqs - running admissions), and the greedy's value of each.
3. Wall time of an overloaded simulation: 10,000 requests of ShareGPT-like lengths at 3 req/s on opt-13b
   (the linear CPU cost model, a 16 GiB pool), capped at --sim-cap-s.

Each checkout runs in its own interpreter (this script as a worker, that checkout's aptserve on the path):

    .venv/bin/python benchmarks/scheduler_cost.py --checkout before=/tmp/sched-base --checkout after=.

Writes <out-dir>/scheduler_cost.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

QUEUE_LENGTHS = (200, 2000, 4096, 10_000)
POLICIES = ("fcfs", "chunked", "apt", "apt-chunked")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", action="append", default=[], help="NAME=PATH (repeatable; default after=.)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--queue-lengths", default=",".join(map(str, QUEUE_LENGTHS)))
    parser.add_argument("--steps", type=int, default=200, help="measured steps per (policy, queue length)")
    parser.add_argument("--sim-requests", type=int, default=10_000)
    parser.add_argument("--sim-cap-s", type=float, default=120.0)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a checkout's path: measure, print JSON
    return parser.parse_args(argv)


# --- the worker: runs against one checkout's aptserve ----------------------------------------------------------
def step_costs(policy: str, queue_len: int, num_steps: int, compare_bound: bool) -> dict:
    import numpy as np

    from aptserve.engine_args import EngineArgs
    from aptserve.sampling import SamplingParams
    from aptserve.sim.cli import model_config
    from aptserve.sim.simulator import sim_engine

    config = model_config("opt-125m", None)
    engine, clock = sim_engine(EngineArgs(model="opt-125m", scheduler=policy, dtype="float32", max_num_seqs=8,
                                          kv_cache_memory=1 << 30), config)
    rng = np.random.default_rng(0)
    clock.time_s = 5.0
    counter = iter(range(10**9))

    def add(arrival_s: float) -> None:
        prompt = rng.integers(10, config.vocab_size, int(rng.integers(16, 513))).tolist()
        engine.add_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True), request_id=str(next(counter)),
                           arrival_s=arrival_s)

    for arrival_s in np.sort(rng.uniform(0.0, 5.0, queue_len)):
        add(float(arrival_s))
    scheduler = engine.scheduler
    schedule, times_s, bound = scheduler.schedule, [], []

    def timed(now: float):
        # Plans are compared on a pass of their own, never timed: pricing the whole queue first would warm the
        # prefix-lookup memo and leave garbage to collect inside the timed step.
        if compare_bound and len(times_s) >= 10:
            bound.append(compare_plans(scheduler, now))
            times_s.append(0.0)
            return schedule(now)
        start = time.perf_counter()
        out = schedule(now)
        times_s.append(time.perf_counter() - start)
        return out

    scheduler.schedule = timed
    while len(times_s) < num_steps + 10:  # 10 steps of warm-up
        for output in engine.step():
            if output.finished:
                add(clock.now())
    if compare_bound:
        return {"bound": {"num_plans": len(bound), "identical": sum(b["identical"] for b in bound),
                          "min_value_ratio": min(b["value_ratio"] for b in bound),
                          "mean_value_ratio": sum(b["value_ratio"] for b in bound) / len(bound)}}
    measured = np.array(times_s[10:]) * 1e3
    result = {"policy": policy, "queue_len": queue_len, "num_steps": len(measured),
              "mean_ms": round(float(measured.mean()), 4), "p50_ms": round(float(np.median(measured)), 4),
              "p99_ms": round(float(np.percentile(measured, 99)), 4), "waiting_at_end": scheduler.num_waiting}
    return result


def compare_plans(scheduler, now: float) -> dict:
    """The plan with the candidate bound and with every waiting request priced, as far as a step can apply it:
    the upgrades and the first max_num_seqs - running admissions (the plan is ordered best first)."""
    from aptserve.sched import apt_scheduler

    num_live = scheduler._num_live(now)
    bounded = scheduler._plan(now, num_live, upgrades=True)
    saved, apt_scheduler.waiting_candidates = apt_scheduler.waiting_candidates, lambda queue, *_: list(queue)
    try:
        full = scheduler._plan(now, num_live, upgrades=True)
    finally:
        apt_scheduler.waiting_candidates = saved
    num_free_seqs = scheduler.config.max_num_seqs - scheduler.num_running

    def applicable(plan):
        admissions = [e for e in plan if isinstance(e[0], apt_scheduler.Admit)][:num_free_seqs]
        return [e for e in plan if not isinstance(e[0], apt_scheduler.Admit)] + admissions

    bounded, full = applicable(bounded), applicable(full)
    full_value = plan_value(scheduler, full, now, num_live)
    return {"identical": bounded == full,
            "value_ratio": plan_value(scheduler, bounded, now, num_live) / full_value if full_value > 0 else 1.0}


def plan_value(scheduler, plan, now: float, num_live: int) -> float:
    """The greedy's objective for a plan: each chosen item's value in its chosen kind."""
    from aptserve.cache.tables import CacheKind
    from aptserve.sched.apt_scheduler import Admit

    total = 0.0
    for item_id, choice in plan:
        request = scheduler.requests[item_id.request_id]
        if isinstance(item_id, Admit):
            item = scheduler._waiting_item(request, now, num_live)
        else:
            item = scheduler._upgrade_item(request, num_live)
        total += item.kv_value if choice == CacheKind.KV or item.hidden_value is None else item.hidden_value
    return total


def sim_wall_time(policy: str, num_requests: int, cap_s: float) -> dict:
    import numpy as np

    from aptserve.bench.arrivals import gamma_send_offsets_s
    from aptserve.bench.datasets import TraceRequest
    from aptserve.engine_args import EngineArgs
    from aptserve.sim.cli import model_config
    from aptserve.sim.simulator import sim_engine, simulate

    rng = np.random.default_rng(0)  # ShareGPT-like: log-normal lengths, prompts <= 1024, prompt + output <= 2048
    prompts = np.clip(rng.lognormal(5.0, 1.0, num_requests), 4, 1024).astype(int)
    outputs = np.clip(rng.lognormal(5.0, 0.9, num_requests), 4, 2048 - prompts).astype(int)
    trace = [TraceRequest("", int(p), int(o)) for p, o in zip(prompts, outputs)]
    engine, clock = sim_engine(EngineArgs(model="opt-13b", scheduler=policy, dtype="float32",
                                          kv_cache_memory=16 << 30), model_config("opt-13b", None))

    class Progress:  # counts finished requests; stops the run at the cap
        num_finished, start_s = 0, time.perf_counter()

        def update(self, n: int) -> None:
            self.num_finished += n
            if time.perf_counter() - self.start_s > cap_s:
                raise TimeoutError

    progress = Progress()
    try:
        simulate(engine, clock, trace, gamma_send_offsets_s(num_requests, 3.0, 1.0, 0), progress=progress)
    except TimeoutError:
        pass
    return {"policy": policy, "num_requests": num_requests, "num_finished": progress.num_finished,
            "wall_s": round(time.perf_counter() - progress.start_s, 1), "capped": progress.num_finished < num_requests,
            "simulated_s": round(clock.now(), 1), "num_steps": engine.core.num_steps}


def worker(args: argparse.Namespace) -> dict:
    sys.path.insert(0, args.worker)
    logging_off()
    has_bound = (Path(args.worker) / "aptserve" / "sched" / "apt_candidates.py").exists()
    policies = args.policies.split(",")
    steps = []
    for policy in policies:
        for queue_len in map(int, args.queue_lengths.split(",")):
            steps.append(step_costs(policy, queue_len, args.steps, False))
            if has_bound and policy.startswith("apt"):  # the same trace again, its plans compared, not timed
                steps[-1].update(step_costs(policy, queue_len, args.steps, True))
    sims = [sim_wall_time(p, args.sim_requests, args.sim_cap_s) for p in policies] if args.sim_requests else []
    return {"step_costs": steps, "sims": sims}


def logging_off() -> None:
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")


# --- the driver ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import RESULTS_DIR, write_json

    checkouts = dict(c.split("=", 1) for c in args.checkout) or {"after": "."}
    results = {}
    for name, path in checkouts.items():
        path = str(Path(path).resolve())
        command = [sys.executable, __file__, "--worker", path, "--policies", args.policies, "--queue-lengths",
                   args.queue_lengths, "--steps", str(args.steps), "--sim-requests", str(args.sim_requests),
                   "--sim-cap-s", str(args.sim_cap_s)]
        print(f"measuring {name} ({path})", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, cwd=path, env={**os.environ, "PYTHONPATH": path})
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(table(name, results[name]), flush=True)
    out_dir = Path(args.out_dir) if args.out_dir else RESULTS_DIR
    write_json(out_dir / "scheduler_cost.json", {
        "benchmark": "scheduler_cost", "checkouts": checkouts, "setting": __doc__.split("\n\n")[1], "results": results})
    plot(out_dir / "scheduler_cost.png", results)
    return 0


def table(name: str, result: dict) -> str:
    lines = [f"{name}: scheduling ms per step (mean / p99) by queue length"]
    lengths = sorted({r["queue_len"] for r in result["step_costs"]})
    lines.append("policy       " + "".join(f"{n:>18,}" for n in lengths))
    for policy in dict.fromkeys(r["policy"] for r in result["step_costs"]):
        rows = {r["queue_len"]: r for r in result["step_costs"] if r["policy"] == policy}
        lines.append(f"{policy:<13}" + "".join(f"{rows[n]['mean_ms']:>10.3f} /{rows[n]['p99_ms']:>6.2f}"
                                               for n in lengths))
    for r in result["step_costs"]:
        if "bound" in r:
            b = r["bound"]
            lines.append(f"  bound {r['policy']} @ {r['queue_len']}: {b['identical']}/{b['num_plans']} plans identical"
                         f", value ratio min {b['min_value_ratio']:.4f} mean {b['mean_value_ratio']:.4f}")
    for s in result["sims"]:
        lines.append(f"  sim {s['policy']}: {s['num_finished']:,}/{s['num_requests']:,} requests in {s['wall_s']} s"
                     f" ({s['num_steps']:,} steps{', capped' if s['capped'] else ''})")
    return "\n".join(lines)


def plot(path: Path, results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, result), style in zip(results.items(), ("--", "-", ":", "-.")):
        for color, policy in enumerate(dict.fromkeys(r["policy"] for r in result["step_costs"])):
            rows = sorted((r["queue_len"], r["mean_ms"]) for r in result["step_costs"] if r["policy"] == policy)
            ax.plot(*zip(*rows), style, marker="o", color=plt.cm.tab10(color), label=f"{policy} ({name})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("requests waiting")
    ax.set_ylabel("Scheduler.schedule, ms per step (mean)")
    ax.set_title("Scheduling cost vs queue length (sim engine, opt-125m shape, max-num-seqs 8)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
