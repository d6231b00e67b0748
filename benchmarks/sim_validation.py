"""The simulator against the real engine on this CPU: the same trace, rates and SLOs, served and simulated.

1. `aptserve profile` fits the linear cost model to this engine's steps (same model, KV and length limits).
2. `aptserve serve` runs a calibration trace (another seed, the middle rate) and then the validation trace at each
   rate through `aptserve bench`'s client. The calibration run alone sets the served path's three terms: the
   per-step phases beyond the forward pass on /metrics (schedule, update, output, gap), how much slower the forward
   pass runs served than the profile prices the same run (the server's processes share the cores), and the unloaded
   TTFT the simulator misses (HTTP, tokenization, the hop to the engine).
3. `aptserve sim` replays the validation trace, rates and SLOs with the profile and those terms: nothing is fitted to
   the points it is judged on.
The JSON has both sets of points and, per rate, the relative error of TTFT and P99 TBT at p50 and p90 and the
attainment difference; the PNG draws both attainment curves and those errors.

    .venv/bin/python benchmarks/sim_validation.py                       # ~8 min on 2 idle cores
    .venv/bin/python benchmarks/sim_validation.py --model opt-125m --rates 4,8,12
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks.common import RESULTS_DIR, git_commit, machine_info, write_json  # noqa: E402
from benchmarks.servers import SERVED_NAME, aptserve_command, running_server, scrape  # noqa: E402

OVERHEAD_PHASES = ("schedule", "update", "output", "gap")
FORWARD_PHASES = ("prepare", "forward", "sample")
QUANTILES = (50, 90)
# A short run whose only use is bench's unloaded probe (10 requests alone, median TTFT); the later --rates and
# --num-requests win over the trace's.
UNLOADED_PROBE = ("--slo-scale", "1", "--num-slo-probes", "10", "--rates", "100", "--num-requests", "20")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--scheduler", default="apt-chunked")
    parser.add_argument("--kv-cache-memory", type=int, default=943_718_400)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-prompt-len", type=int, default=512)
    parser.add_argument("--max-output-len", type=int, default=128)
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--rates", default="2,4,6", help="below, at and above the knee")
    parser.add_argument("--ttft-slo", type=float, default=0.32)
    parser.add_argument("--tbt-slo", type=float, default=0.19)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="served runs of the validation trace")
    parser.add_argument("--port", type=int, default=8150)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--record-case", default=None, metavar="JSON",
                        help="also write the served figures and the simulator's inputs as a recorded case for "
                             "tests/test_sim_recorded_case.py")
    return parser.parse_args(argv)


def cli(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "aptserve.cli", *argv], check=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sim-validation-"))
    max_len = args.max_prompt_len + args.max_output_len
    engine = ["--max-model-len", str(max_len), "--kv-cache-memory", str(args.kv_cache_memory),
              "--max-num-seqs", str(args.max_num_seqs), "--scheduler", args.scheduler]
    trace = ["--dataset", "sharegpt", "--num-requests", str(args.num_requests), "--max-prompt-len",
             str(args.max_prompt_len), "--max-output-len", str(args.max_output_len), "--rates", args.rates,
             "--seed", str(args.seed), "--no-progress"]
    cli("profile", "--model", args.model, *engine, "--out", str(work / "profile.json"), "--no-progress")

    argv_serve, env = aptserve_command(args.model, args.kv_cache_memory, args.max_num_seqs, max_len, args.port,
                                       threads=2, scheduler=args.scheduler)
    bench = ["bench", "run", "--model", SERVED_NAME, "--tokenizer", _tokenizer(args.model), *trace]
    slo_flags = ["--ttft-slo", str(args.ttft_slo), "--tbt-slo", str(args.tbt_slo)]
    calibration = ["--seed", str(args.seed + 1), "--rates", args.rates.split(",")[1]]  # the middle rate
    with running_server("aptserve", argv_serve, env, work, args.port, timeout_s=600) as (url, _):
        cli(*bench, "--base-url", url, *UNLOADED_PROBE, "--out", str(work / "unloaded.json"))  # for its probe
        before = scrape(url)
        cli(*bench, "--base-url", url, *slo_flags, *calibration, "--out", str(work / "calibration.json"))
        served_steps = _phase_deltas(before, scrape(url))
        for i in range(args.repeats):  # the same trace and arrivals each time: the spread is the server's own
            cli(*bench, "--base-url", url, *slo_flags, "--out", str(work / f"real{i}.json"))
    step_overhead_s = sum(served_steps[phase]["mean_s"] for phase in OVERHEAD_PHASES)
    served_forward_s = sum(served_steps[phase]["sum_s"] for phase in FORWARD_PHASES)
    served_unloaded = json.loads((work / "unloaded.json").read_text())["slo"]["unloaded"]["median_ttft_s"]

    sim_common = ["sim", "--model", args.model, "--cost-model", str(work / "profile.json"), *engine, *trace,
                  "--step-overhead-s", str(step_overhead_s)]
    cli(*sim_common, *slo_flags, *calibration, "--out", str(work / "sim_calibration.json"))
    priced_s = json.loads((work / "sim_calibration.json").read_text())["servers"][args.scheduler]["points"][0][
        "priced_step_s"]
    step_time_scale = served_forward_s / priced_s
    sim_served = [*sim_common, "--step-time-scale", str(step_time_scale)]
    cli(*sim_served, *UNLOADED_PROBE, "--out", str(work / "sim_unloaded.json"))
    simulated_unloaded = json.loads((work / "sim_unloaded.json").read_text())["slo"]["unloaded"]["median_ttft_s"]
    request_latency_s = max(0.0, served_unloaded - simulated_unloaded)
    cli(*sim_served, *slo_flags, "--request-latency-s", str(request_latency_s), "--out", str(work / "sim.json"))

    real = [json.loads((work / f"real{i}.json").read_text())["servers"]["server"]["points"]
            for i in range(args.repeats)]
    sim = json.loads((work / "sim.json").read_text())["servers"][args.scheduler]["points"]
    comparison = [_compare([run[k] for run in real], point) for k, point in enumerate(sim)]
    for row in comparison:
        print(json.dumps(row))
    out_dir = Path(args.out_dir)
    payload = {"benchmark": "sim_validation", "config": vars(args), "calibration": {
                   "served_phases": served_steps, "served_forward_s": served_forward_s, "priced_forward_s": priced_s,
                   "step_time_scale": step_time_scale, "step_overhead_s": step_overhead_s,
                   "request_latency_s": request_latency_s}, "profile": json.loads((work / "profile.json").read_text()),
               "comparison": comparison, "real_points": real[0], "sim_points": sim}
    write_json(out_dir / "sim_validation.json", payload)
    if args.record_case:
        _record_case(Path(args.record_case), args, engine, trace, payload)
    _plot(out_dir / "sim_validation.png", comparison, args)
    return 0


def _record_case(path: Path, args, engine: list[str], trace: list[str], payload: dict) -> None:
    """What `aptserve sim` needs to replay the validation trace (the profile's coefficients, the calibrated terms,
    the flags) and the served figures it must match, without the per-request latencies."""
    calibration = payload["calibration"]
    profile = {k: v for k, v in payload["profile"].items() if k != "points"}
    served = [{k: v for k, v in row.items() if not k.endswith("_sim") and k != "attainment_diff"}
              for row in payload["comparison"]]
    for row in served:
        for key, value in list(row.items()):
            if isinstance(value, dict):
                row[key], row[f"{key}_rel_spread"] = value["real"], value["rel_spread"]
    case = {"machine": machine_info(), "git": git_commit(), "profile": profile,
            "sim_flags": ["--model", args.model, *engine, *trace, "--ttft-slo", str(args.ttft_slo), "--tbt-slo",
                          str(args.tbt_slo), "--step-overhead-s", str(calibration["step_overhead_s"]),
                          "--step-time-scale", str(calibration["step_time_scale"]), "--request-latency-s",
                          str(calibration["request_latency_s"])],
            "served": served}
    path.write_text(json.dumps(case, indent=1) + "\n")


def _tokenizer(model: str) -> str:
    from aptserve.registry import resolve_model

    return resolve_model(model)


def _phase_deltas(before: dict, after: dict) -> dict:
    """Each step phase's count, sum and mean over what the server did between two scrapes of /metrics."""
    deltas = {}
    for phase in (*OVERHEAD_PHASES, *FORWARD_PHASES):
        labels = (("phase", phase),)
        count, total = (after.get((f"aptserve:step_phase_seconds_{k}", labels), 0.0)
                        - before.get((f"aptserve:step_phase_seconds_{k}", labels), 0.0) for k in ("count", "sum"))
        deltas[phase] = {"count": count, "sum_s": total, "mean_s": total / count if count else 0.0}
    return deltas


def _quantile(point: dict, metric: str, q: int) -> float:
    return float(np.percentile([v for v in point["requests"][metric] if v is not None], q))


def _compare(repeats: list[dict], sim: dict) -> dict:
    """One rate: the served figures (the median over the repeated runs, and their spread: (max - min) / median for
    latencies, max - min for attainment) against the simulated ones."""
    served = [r["attainment"] for r in repeats]
    attainment = float(np.median(served))
    row = {"rate": sim["rate"], "attainment_real": attainment, "attainment_sim": sim["attainment"],
           "attainment_diff": sim["attainment"] - attainment, "attainment_runs": served,
           "attainment_spread": max(served) - min(served)}
    for metric in ("ttft_s", "p99_tbt_s"):
        for q in QUANTILES:
            runs = [_quantile(r, metric, q) for r in repeats]
            measured, simulated = float(np.median(runs)), _quantile(sim, metric, q)
            row[f"{metric}_p{q}"] = {"real": measured, "sim": simulated, "rel_error": simulated / measured - 1,
                                     "runs": runs, "rel_spread": (max(runs) - min(runs)) / measured}
    return row


def _plot(path: Path, comparison: list[dict], args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [row["rate"] for row in comparison]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(rates, [row["attainment_real"] for row in comparison], "o-", label="served (median of runs)")
    for row in comparison:
        left.scatter([row["rate"]] * len(row["attainment_runs"]), row["attainment_runs"], color="C0", s=10, alpha=0.5)
    left.plot(rates, [row["attainment_sim"] for row in comparison], "s--", label="simulated")
    left.set(xlabel="request rate (req/s)", ylabel="SLO attainment (paper rule)", ylim=(0, 1.02),
             title="attainment: served vs simulated")
    left.legend()
    for metric in ("ttft_s", "p99_tbt_s"):
        for q in QUANTILES:
            right.plot(rates, [100 * row[f"{metric}_p{q}"]["rel_error"] for row in comparison], "o-",
                       label=f"{metric} p{q}")
    right.axhspan(-15, 15, color="grey", alpha=0.15, label="+-15%")
    right.set(xlabel="request rate (req/s)", ylabel="simulated / served - 1 (%)", title="latency error")
    right.legend(fontsize=8)
    fig.suptitle(f"{args.model}, {args.scheduler}, ShareGPT x {args.num_requests}, SLOs TTFT {args.ttft_slo} s, "
                 f"P99 TBT {args.tbt_slo} s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
