"""Preemption by demotion at the paper's scale, simulated: where memory binds, does keeping a victim running as
hidden rows (its K/V solved back in place) pay against freeing it to prefill again?

apt-chunked in each cell of paper_scale.py's memory-bound setups, four ways, each's effective throughput found by the
same search on the same deterministic simulation (roofline cost model, template SLOs, --slo-aware):
  kv                 the hybrid cache off;
  hybrid/recompute   the hybrid cache auto, --preemption-mode recompute (the default: a victim is freed);
  hybrid/demote      --preemption-mode hidden: a victim is demoted where a hidden admission of it would be offered
                     (StepTime.offers_hidden: its re-projection within every decoding request's planned gap, and no
                     more than a request's share of the step), the engine's rule; the KV budget is smaller by the
                     K/V left inverses the engine keeps for it (RooflineCostModel.kv_inverse_bytes);
  hybrid/demote-tbt  the looser rule tried against it: the planned gaps alone (no share test), patched in for the run.
Each point records the preemptions, demotions and hidden admissions the scheduler chose.

    .venv/bin/python benchmarks/demotion_ab.py            # ~5 min with --jobs 2
Writes benchmarks/results/demotion_ab.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks.common import RESULTS_DIR, write_json  # noqa: E402
from benchmarks.paper_scale import (_TRACES, SETUPS, _init_worker, _Measure, _rate, effective_rate,  # noqa: E402
                                    load_traces, sim_argv)

VARIANTS = (("kv", {"hybrid_cache": "off"}, False),
            ("hybrid/recompute", {"hybrid_cache": "auto", "preemption_mode": "recompute"}, False),
            ("hybrid/demote", {"hybrid_cache": "auto", "preemption_mode": "hidden"}, False),
            ("hybrid/demote-tbt", {"hybrid_cache": "auto", "preemption_mode": "hidden"}, True))
COUNTS = ("num_preemptions", "num_demotions", "hidden_admissions")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default="opt-13b,opt-30b-1gpu,opt-66b-2gpu")
    parser.add_argument("--workloads", default="sharegpt,longbench")
    parser.add_argument("--cvs", default="1,4")
    parser.add_argument("--num-requests", type=int, default=400, help="per rate probed")
    parser.add_argument("--max-probes", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


@contextlib.contextmanager
def tbt_only_demotion():
    """AptScheduler demoting a victim where its re-projection fits the planned gaps, whatever its share of the step."""
    from aptserve.sched.apt_scheduler import AptScheduler

    def keeps_running_hidden(self, request, now):
        time = self._step_time(now)
        recompute_s, _ = self._hidden_row_s(self.cache.num_blocks(request.num_tokens))
        return not request.is_past_slo(now) and recompute_s <= time.limit_s(request)

    original = AptScheduler._keeps_running_hidden
    AptScheduler._keeps_running_hidden = keeps_running_hidden
    try:
        yield
    finally:
        AptScheduler._keeps_running_hidden = original


def run_cell(cell: tuple, options: argparse.Namespace, traces: dict) -> dict:
    from aptserve.bench.serving import effective_throughput
    from aptserve.cli import build_parser
    from aptserve.sim.cli import Simulation

    setup, workload, cv = cell
    args = build_parser().parse_args(sim_argv(setup, workload, cv, "template", options))
    sim = Simulation.from_args(args, trace=traces[workload])
    slos = sim.slos("fcfs", hybrid_cache="off")
    variants = {}
    for name, flags, patched in VARIANTS:
        with tbt_only_demotion() if patched else contextlib.nullcontext():
            measure = _Measure(sim, "apt-chunked", flags, slos)
            effective_rate(measure, options.max_probes)
        points = [measure.points[r] for r in sorted(measure.points)]
        variants[name] = {**flags, "tbt_only": patched, "points": points,
                          "effective_throughput": effective_throughput(points, args.target),
                          **{count: sum(p[count] for p in points) for count in COUNTS}}
    return {"setup": setup.label, "workload": workload, "cv": cv, "slo": {k: v for k, v in slos.items()
                                                                         if k != "unloaded"}, "variants": variants}


def _run(cell: tuple, options: argparse.Namespace) -> dict:
    return run_cell(cell, options, _TRACES)


def markdown(cells: list[dict]) -> str:
    names = [name for name, _, _ in VARIANTS]
    lines = ["# Preemption by demotion, simulated (apt-chunked, template SLOs)", "",
             "Effective throughput in req/s (paper rule; `-`: no crossing found), and over all probes of the search "
             "the preemptions / demotions / hidden admissions the scheduler chose.", "",
             "| cell | " + " | ".join(names) + " | " + " | ".join(f"{n}: pre / dem / hid" for n in names[1:]) + " |",
             "|---|" + "---|" * (2 * len(names) - 1)]
    for cell in cells:
        v = cell["variants"]
        rates = [_rate(v[n]) for n in names]
        counts = [" / ".join(str(v[n][c]) for c in COUNTS) for n in names[1:]]
        lines.append(f"| {cell['setup']}, {cell['workload']} cv {cell['cv']:g} | "
                     + " | ".join("-" if r is None else f"{r:.2f}" for r in rates) + " | " + " | ".join(counts) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    options = parse_args(argv)
    workloads = options.workloads.split(",")
    cells = [(SETUPS[s], w, float(cv)) for s in options.setups.split(",") for w in workloads
             for cv in options.cvs.split(",")]
    traces = load_traces(workloads, options)
    with ProcessPoolExecutor(options.jobs, initializer=_init_worker, initargs=(traces,)) as pool:
        results = []
        for result in pool.map(_run, cells, [options] * len(cells)):
            results.append(result)
            print(f"{result['setup']}, {result['workload']} cv {result['cv']:g}: " + ", ".join(
                f"{n} {_rate(v)} ({v['num_demotions']} demotions)" for n, v in result["variants"].items()),
                flush=True)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    config = {**vars(options), "out_dir": str(options.out_dir)}
    write_json(options.out_dir / "demotion_ab.json", {"benchmark": "demotion_ab", "config": config, "cells": results})
    (options.out_dir / "demotion_ab.md").write_text(markdown(results))
    print(f"wrote {options.out_dir / 'demotion_ab.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
