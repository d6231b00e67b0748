"""The simulator against the real engine on this CPU: the same trace, rates and SLOs, served and simulated.

A server (`aptserve serve --step-log`) first runs a calibration trace (another seed, the middle rate), then the
validation trace `--repeats` times at each rate through `aptserve bench`'s client (the spread of those runs is the
server's own). The calibration run alone sets the simulator's inputs, in two ways compared side by side:
- served_steps: `aptserve profile --from-step-log` fits the cost model to the calibration run's own steps (the
  server's other processes sharing the cores included) and takes the median per-step overhead beyond the forward pass;
- grid_profile: `aptserve profile` times a bare engine over a grid; the served forward seconds of the calibration run
  over what that profile prices for the same run give --step-time-scale, and /metrics the mean overhead phases.
Both add the unloaded TTFT served minus simulated (HTTP, tokenization, the hop to the engine). Nothing is fitted to
the points judged. Per rate and calibration: the relative error of TTFT and P99 TBT at p50 and p90 and the
attainment difference; the PNG draws the attainment curves and those errors.

    .venv/bin/python benchmarks/sim_validation.py                       # ~12 min on 2 idle cores
    .venv/bin/python benchmarks/sim_validation.py --model opt-125m --rates 4,8,12   # -> sim_validation_opt125m.*
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks.common import RESULTS_DIR, git_commit, machine_info, write_json  # noqa: E402
from benchmarks.servers import SERVED_NAME, aptserve_command, running_server, scrape  # noqa: E402
import aptserve.sim.profile as profile_phases  # noqa: E402

# The step phases as /metrics labels them (the step log's field names without "_s").
OVERHEAD_PHASES = tuple(p.removesuffix("_s") for p in profile_phases.OVERHEAD_PHASES)
FORWARD_PHASES = tuple(p.removesuffix("_s") for p in profile_phases.FORWARD_PHASES)
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
    parser.add_argument("--case-calibration", default="grid_profile", choices=("grid_profile", "served_steps"),
                        help="the calibration the recorded case keeps")
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
    cli("profile", "--model", args.model, *engine, "--out", str(work / "grid_profile.json"), "--no-progress")

    step_log = work / "steps.jsonl"
    argv_serve, env = aptserve_command(args.model, args.kv_cache_memory, args.max_num_seqs, max_len, args.port,
                                       threads=2, scheduler=args.scheduler, extra=["--step-log", str(step_log)])
    bench = ["bench", "run", "--model", SERVED_NAME, "--tokenizer", _tokenizer(args.model), *trace]
    slo_flags = ["--ttft-slo", str(args.ttft_slo), "--tbt-slo", str(args.tbt_slo)]
    calibration = ["--seed", str(args.seed + 1), "--rates", args.rates.split(",")[1]]  # the middle rate
    with running_server("aptserve", argv_serve, env, work, args.port, timeout_s=600) as (url, _):
        cli(*bench, "--base-url", url, *UNLOADED_PROBE, "--out", str(work / "unloaded.json"))  # for its probe
        before, first_step = scrape(url), _num_lines(step_log)
        cli(*bench, "--base-url", url, *slo_flags, *calibration, "--out", str(work / "calibration.json"))
        time.sleep(1.0)  # the last step's line follows its tokens
        served_steps = _phase_deltas(before, scrape(url))
        calibration_log = work / "calibration_steps.jsonl"
        calibration_log.write_text("".join(step_log.read_text().splitlines(keepends=True)[first_step:]))
        for i in range(args.repeats):  # the same trace and arrivals each time: the spread is the server's own
            cli(*bench, "--base-url", url, *slo_flags, "--out", str(work / f"real{i}.json"))
    served_unloaded = json.loads((work / "unloaded.json").read_text())["slo"]["unloaded"]["median_ttft_s"]
    real = [json.loads((work / f"real{i}.json").read_text())["servers"]["server"]["points"]
            for i in range(args.repeats)]

    def simulate(name: str, profile: Path, step_overhead_s: float, step_time_scale: float | None = None) -> dict:
        """Simulate the validation trace with one calibration: the unloaded probe first, for the request latency."""
        flags = ["sim", "--model", args.model, "--cost-model", str(profile), *engine, *trace,
                 "--step-overhead-s", str(step_overhead_s)]
        if step_time_scale is None:  # the grid profile: scale it by the served forward seconds of the calibration
            cli(*flags, *slo_flags, *calibration, "--out", str(work / f"sim_{name}_calibration.json"))
            priced_s = _points(work / f"sim_{name}_calibration.json", args.scheduler)[0]["priced_step_s"]
            step_time_scale = sum(served_steps[phase]["sum_s"] for phase in FORWARD_PHASES) / priced_s
        flags += ["--step-time-scale", str(step_time_scale)]
        cli(*flags, *UNLOADED_PROBE, "--out", str(work / f"sim_{name}_unloaded.json"))
        simulated_unloaded = json.loads((work / f"sim_{name}_unloaded.json").read_text())["slo"]["unloaded"][
            "median_ttft_s"]
        request_latency_s = max(0.0, served_unloaded - simulated_unloaded)
        cli(*flags, *slo_flags, "--request-latency-s", str(request_latency_s), "--out", str(work / f"sim_{name}.json"))
        sim = _points(work / f"sim_{name}.json", args.scheduler)
        return {"terms": {"step_overhead_s": step_overhead_s, "step_time_scale": step_time_scale,
                          "request_latency_s": request_latency_s},
                "profile": json.loads(profile.read_text()), "sim_flags": flags[1:] + [
                    *slo_flags, "--request-latency-s", str(request_latency_s)],
                "comparison": [_compare([run[k] for run in real], point) for k, point in enumerate(sim)],
                "sim_points": sim}

    # A: the served engine's own steps in the calibration run, fitted. B: the grid profile of a bare engine, with
    # the served forward pass's slowdown and the mean served overhead phases of the calibration run.
    cli("profile", "--model", args.model, "--from-step-log", str(calibration_log), "--out",
        str(work / "served_profile.json"))
    served_fit = json.loads((work / "served_profile.json").read_text())
    calibrations = {
        "served_steps": simulate("served_steps", work / "served_profile.json", served_fit["step_overhead_s"], 1.0),
        "grid_profile": simulate("grid_profile", work / "grid_profile.json",
                                 sum(served_steps[phase]["mean_s"] for phase in OVERHEAD_PHASES)),
    }
    for name, result in calibrations.items():
        for row in result["comparison"]:
            print(name, json.dumps({k: v if not isinstance(v, dict) else round(v["rel_error"], 3)
                                    for k, v in row.items()}))
    for result in calibrations.values():
        result["effective_throughput"] = effective_throughputs(result["comparison"])
    out_dir = Path(args.out_dir)
    payload = {"benchmark": "sim_validation", "config": vars(args), "served_phases": served_steps,
               "calibrations": calibrations, "real_points": real[0]}
    stem = "sim_validation" if args.model == "default" else f"sim_validation_{args.model.replace('-', '')}"
    write_json(out_dir / f"{stem}.json", payload)
    _plot(out_dir / f"{stem}.png", calibrations, args)
    if args.record_case:
        _record_case(Path(args.record_case), calibrations[args.case_calibration])
    return 0


def _without_option(flags: list[str], option: str) -> list[str]:
    i = flags.index(option)
    return flags[:i] + flags[i + 2:]


def effective_throughputs(comparison: list[dict], target: float = 0.9) -> dict:
    """Served (median attainment of the runs) and simulated: the rate where attainment crosses `target`,
    interpolated between the probed rates (None where it does not cross inside them)."""
    from aptserve.bench.sweep import interpolate_crossing

    rates = [row["rate"] for row in comparison]
    return {side: interpolate_crossing(rates, [row[f"attainment_{side}"] for row in comparison], target)
            for side in ("real", "sim")}


def _num_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _points(path: Path, scheduler: str) -> list[dict]:
    return json.loads(path.read_text())["servers"][scheduler]["points"]


def _record_case(path: Path, calibration: dict) -> None:
    """What `aptserve sim` needs to replay the validation trace (the fitted coefficients, the calibrated terms, the
    flags) and the served figures it must match (medians and spreads), without the per-request latencies."""
    served = []
    for row in calibration["comparison"]:
        kept = {"rate": row["rate"], "attainment_real": row["attainment_real"],
                "attainment_spread": row["attainment_spread"]}
        for key, value in row.items():
            if isinstance(value, dict):
                kept[key], kept[f"{key}_rel_spread"] = value["real"], value["rel_spread"]
        served.append(kept)
    profile = {k: v for k, v in calibration["profile"].items() if k != "points"}
    case = {"machine": machine_info(), "git": git_commit(), "profile": profile,
            "sim_flags": _without_option(calibration["sim_flags"], "--cost-model"), "served": served}
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


def _plot(path: Path, calibrations: dict, args) -> None:
    """Left: attainment served (median and each run) and simulated under each calibration; then one panel per
    calibration with the latency errors against the +-15% band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(calibrations), figsize=(6 * (1 + len(calibrations)), 4.5))
    first = next(iter(calibrations.values()))["comparison"]
    rates = [row["rate"] for row in first]
    axes[0].plot(rates, [row["attainment_real"] for row in first], "o-", label="served (median of runs)")
    for row in first:
        axes[0].scatter([row["rate"]] * len(row["attainment_runs"]), row["attainment_runs"], color="C0", s=10,
                        alpha=0.5)
    for name, result in calibrations.items():
        axes[0].plot(rates, [row["attainment_sim"] for row in result["comparison"]], "s--", label=f"simulated, {name}")
    axes[0].set(xlabel="request rate (req/s)", ylabel="SLO attainment (paper rule)", ylim=(0, 1.02),
                title="attainment: served vs simulated")
    axes[0].legend(fontsize=8)
    for ax, (name, result) in zip(axes[1:], calibrations.items()):
        for metric in ("ttft_s", "p99_tbt_s"):
            for q in QUANTILES:
                ax.plot(rates, [100 * row[f"{metric}_p{q}"]["rel_error"] for row in result["comparison"]], "o-",
                        label=f"{metric} p{q}")
        ax.axhspan(-15, 15, color="grey", alpha=0.15, label="+-15%")
        ax.set(xlabel="request rate (req/s)", ylabel="simulated / served - 1 (%)", title=f"latency error, {name}")
        ax.legend(fontsize=8)
    fig.suptitle(f"{args.model}, {args.scheduler}, ShareGPT x {args.num_requests}, SLOs TTFT {args.ttft_slo} s, "
                 f"P99 TBT {args.tbt_slo} s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
