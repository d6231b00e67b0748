"""`aptserve sim` as a capacity planner runs it: the real policies at paper scale on the GPU roofline, the same
trace/SLO/output flags as `aptserve bench`, and the same JSON for the same seed, byte for byte."""
from __future__ import annotations

import json

import pytest

from aptserve.cli import main
from tests.test_cli_errors import bad_flags_error

ARGS = ["sim", "--model", "opt-13b", "--gpu", "a100-40gb", "--dataset", "sharegpt", "--num-requests", "60",
        "--rates", "1,4,64", "--ttft-slo", "0.25", "--tbt-slo", "0.1", "--policies", "fcfs,apt-chunked",
        "--no-progress"]


def test_sim_is_deterministic_and_reports_like_bench(tmp_path):
    first, second = tmp_path / "a" / "sim.json", tmp_path / "b" / "sim.json"
    for out in (first, second):
        outputs = ["--out", str(tmp_path / "sim.json"), "--plot", str(tmp_path / "sim.png")]
        assert main([*ARGS, "--seed", "3", *outputs]) == 0
        out.parent.mkdir()
        (tmp_path / "sim.json").rename(out)
    assert first.read_bytes() == second.read_bytes()
    assert (tmp_path / "sim.png").stat().st_size > 10_000
    result = json.loads(first.read_text())
    assert list(result["servers"]) == ["fcfs", "apt-chunked"] and "apt-chunked/fcfs" in result["ratios"]
    assert result["config"]["cost_model"]["kind"] == "RooflineCostModel"
    for server in result["servers"].values():
        points = server["points"]
        assert [p["rate"] for p in points] == [1.0, 4.0, 64.0] and all(p["completed"] == 60 for p in points)
        assert points[0]["attainment"] > points[-1]["attainment"]  # 64 req/s is past a 13B model on one A100


def test_slo_scale_is_measured_on_the_simulated_system(tmp_path):
    out = tmp_path / "sim.json"
    args = [a for a in ARGS if a not in ("--ttft-slo", "0.25", "--tbt-slo", "0.1")]
    assert main([*args, "--slo-scale", "5", "--out", str(out)]) == 0
    slo = json.loads(out.read_text())["slo"]
    assert slo["source"] == "slo_scale"
    assert 0.02 < slo["unloaded"]["median_p99_tbt_s"] < 0.05  # an OPT-13B decode step on an A100
    assert slo["tbt_slo_s"] == 5 * slo["unloaded"]["median_p99_tbt_s"]


def test_the_served_path_terms_shift_ttft_and_lengthen_steps():
    from aptserve.bench.datasets import TraceRequest
    from aptserve.engine_args import EngineArgs
    from aptserve.registry import shape_model_config
    from aptserve.sim.executor import CostModelExecutor, LinearCostModel
    from aptserve.sim.simulator import sim_engine, simulate

    model, cost = shape_model_config("opt-125m"), LinearCostModel()
    args = EngineArgs(model="opt-125m", kv_cache_memory=256 << 20, scheduler="fcfs", alpha=0.0)

    executors = []

    def served(step_overhead_s: float, latency_s: float, scale: float = 1.0):
        def executor(clock, model):
            executors.append(CostModelExecutor(clock, model, step_overhead_s=step_overhead_s, step_time_scale=scale))
            return executors[-1]

        engine, clock = sim_engine(args, model, cost, make_executor=executor)
        return simulate(engine, clock, [TraceRequest("", 40, 5)], [0.0], request_latency_s=latency_s)[0]

    bare, served_path, slowed = served(0.0, 0.0), served(0.002, 0.03), served(0.0, 0.0, scale=1.5)
    assert served_path.first_token_s - bare.first_token_s == pytest.approx(0.002 + 0.03)
    bare_gaps = [b - a for a, b in zip(bare.token_times_s, bare.token_times_s[1:])]
    gaps = [b - a for a, b in zip(served_path.token_times_s, served_path.token_times_s[1:])]
    assert gaps == pytest.approx([gap + 0.002 for gap in bare_gaps])
    # The served slowdown stretches every priced step; what the cost model priced stays the same.
    assert slowed.token_times_s == pytest.approx([1.5 * t for t in bare.token_times_s])
    assert executors[2].priced_s == pytest.approx(executors[0].priced_s) == pytest.approx(bare.token_times_s[-1])


def test_bisect_refines_between_the_last_pass_and_the_first_failure(tmp_path):
    out = tmp_path / "sim.json"
    args = [a for a in ARGS if a not in ("--policies", "fcfs,apt-chunked")]
    assert main([*args, "--scheduler", "fcfs", "--bisect", "--max-probes", "6", "--out", str(out)]) == 0
    server = json.loads(out.read_text())["servers"]["fcfs"]
    rates = [p["rate"] for p in server["points"]]
    assert len(rates) == 6 and rates == sorted(rates) and {1.0, 4.0, 64.0} <= set(rates)
    passing = [p["rate"] for p in server["points"] if p["attainment"] >= 0.9]
    failing = [p["rate"] for p in server["points"] if p["attainment"] < 0.9]
    assert server["effective_throughput"]["paper"]["best_rate"] == max(passing)
    assert passing and failing and max(passing) < min(failing) < 64.0  # bisection probed inside the bracket


@pytest.mark.parametrize("flag,value", [("--step-time-scale", "0"), ("--step-overhead-s", "-0.1"),
                                        ("--request-latency-s", "-1")])
def test_served_path_terms_out_of_range_are_refused(flag, value, tmp_path, capsys):
    assert "step-time-scale" in bad_flags_error([*ARGS, flag, value, "--out", str(tmp_path / "sim.json")], capsys)


def test_a_trace_the_dataset_cannot_fill_is_a_usage_error(tmp_path, capsys):
    args = [a if a != "60" else "100000" for a in ARGS]
    error = bad_flags_error([*args, "--out", str(tmp_path / "sim.json")], capsys)
    assert "ShareGPT pairs" in error and "100000 asked for" in error
