"""`aptserve bench run | compare` end to end against real aptserve servers on the simulator's executor (real HTTP,
real SSE, the real SmolLM2 tokenizer; no model weights), plus the effective-throughput rule on fixed numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from aptserve.bench.serving import effective_throughput, throughput_ratios
from aptserve.cli import main
from aptserve.registry import resolve_model
from tests.test_cli_errors import bad_flags_error
from tests.test_server import running_server
from tests.test_server_robustness import SIM, sim_engine

NUM_REQUESTS, PROMPT_LEN, OUTPUT_LEN = 6, 16, 8
LOOSE_SLO = ["--ttft-slo", "60", "--tbt-slo", "60"]


def bench_args(tmp_path, *extra: str) -> list[str]:
    return ["bench", *extra, "--model", SIM, "--tokenizer", resolve_model("default"), "--dataset", "synthetic",
            "--prompt-len", str(PROMPT_LEN), "--output-len", str(OUTPUT_LEN), "--num-requests", str(NUM_REQUESTS),
            "--num-slo-probes", "2", "--out", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png"),
            "--no-progress"]


def read_result(tmp_path) -> dict:
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((tmp_path / "bench.json").read_text())


@pytest.fixture(scope="module")
def sim_url():
    with running_server(sim_engine(num_units=64, max_num_seqs=4, step_s=0.002)) as live:
        yield live.base_url


def test_run_sweeps_rates_and_writes_json_and_plot(tmp_path, sim_url):
    argv = bench_args(tmp_path, "run", "--base-url", sim_url, "--rates", "20,5", *LOOSE_SLO)
    assert main(argv) == 0
    result = read_result(tmp_path)
    server = result["servers"]["server"]
    assert [p["rate"] for p in server["points"]] == [5.0, 20.0]
    for point in server["points"]:
        assert point["completed"] == NUM_REQUESTS and point["failed"] == 0
        assert point["num_output_tokens"] == NUM_REQUESTS * OUTPUT_LEN  # max_tokens = trace length, EOS ignored
        assert point["attainment"] == point["attainment_vllm"] == 1.0
        for key in ("mean_ttft_s", "p50_ttft_s", "p99_ttft_s", "mean_tpot_s", "p99_itl_s", "request_throughput"):
            assert point[key] > 0
        assert len(point["requests"]["ttft_s"]) == NUM_REQUESTS and None not in point["requests"]["ttft_s"]
    assert server["effective_throughput"]["paper"]["best_rate"] == 20.0
    assert result["slo"] == {"ttft_slo_s": 60.0, "tbt_slo_s": 60.0, "tpot_slo_s": 60.0, "source": "explicit"}
    assert result["trace"]["mean_prompt_len"] == PROMPT_LEN and result["ratios"] == {}


def test_unreachable_slo_gives_no_effective_throughput(tmp_path, sim_url):
    argv = bench_args(tmp_path, "run", "--base-url", sim_url, "--rate", "10", "--ttft-slo", "1e-9", "--tbt-slo", "60")
    assert main(argv) == 0
    server = read_result(tmp_path)["servers"]["server"]
    assert server["points"][0]["attainment"] == 0.0 and server["points"][0]["attainment_ttft_only"] == 0.0
    assert server["effective_throughput"]["paper"] == {"best_rate": None, "interpolated_rate": None}


def test_slo_scale_sets_slos_from_the_unloaded_probe(tmp_path, sim_url):
    assert main(bench_args(tmp_path, "run", "--base-url", sim_url, "--rate", "10", "--slo-scale", "3")) == 0
    result = read_result(tmp_path)
    slo, unloaded = result["slo"], result["slo"]["unloaded"]
    assert slo["source"] == "slo_scale" and slo["slo_scale"] == 3.0 and "median" in slo["unloaded_definition"]
    assert len(unloaded["ttft_s"]) == len(unloaded["probe_prompt_lens"]) == 2
    assert unloaded["median_ttft_s"] == pytest.approx(float(np.median(unloaded["ttft_s"])))
    assert slo["ttft_slo_s"] == pytest.approx(3 * unloaded["median_ttft_s"])
    assert slo["tbt_slo_s"] == pytest.approx(3 * unloaded["median_p99_tbt_s"]) and slo["tbt_slo_s"] > 0
    assert slo["tpot_slo_s"] == pytest.approx(3 * unloaded["median_mean_tpot_s"])
    assert result["servers"]["server"]["unloaded"] == unloaded


def test_compare_runs_the_baseline_first_and_reports_ratios(tmp_path, sim_url):
    with running_server(sim_engine(num_units=64, max_num_seqs=2, step_s=0.004)) as other:
        argv = bench_args(tmp_path, "compare", "--base-url", f"fast={sim_url}", "--base-url",
                          f"slow={other.base_url}", "--baseline", "slow", "--rates", "4,8", *LOOSE_SLO)
        assert main(argv) == 0
    result = read_result(tmp_path)
    assert list(result["servers"]) == ["slow", "fast"] and result["baseline"] == "slow"
    assert result["ratios"]["fast/slow"]["paper"]["best_rate"] == 1.0  # both pass at 8 req/s


def test_effective_throughput_from_recorded_attainments():
    points = [{"rate": 1.0, "attainment": 1.0, "attainment_vllm": 1.0},
              {"rate": 2.0, "attainment": 0.95, "attainment_vllm": 1.0},
              {"rate": 3.0, "attainment": 0.5, "attainment_vllm": 0.92},
              {"rate": 4.0, "attainment": 0.92, "attainment_vllm": 0.6}]  # noise can pass again above the knee
    result = effective_throughput(points, target=0.9)
    assert result["paper"]["best_rate"] == 4.0  # the highest passing rate, as sweep_rates reports it
    assert result["paper"]["interpolated_rate"] == pytest.approx(2 + 0.05 / 0.45)  # the first crossing
    assert result["vllm"] == {"best_rate": 3.0, "interpolated_rate": pytest.approx(3 + 0.02 / 0.32)}
    ours = {"effective_throughput": effective_throughput(points[:2], 0.9)}  # passes everywhere: no crossing
    ratios = throughput_ratios({"peer": {"effective_throughput": result}, "ours": ours}, "peer")
    assert ratios["ours/peer"]["paper"] == {"best_rate": 0.5, "interpolated_rate": None}


@pytest.mark.parametrize("extra, message", [
    (["--rate", "1", "--rates", "1,2", *LOOSE_SLO], "exactly one of --rate"),
    (["--rate", "1", "--ttft-slo", "1"], "--slo-scale"),
    (["--rate", "1", *LOOSE_SLO, "--max-prompt-len", "10"], "does not apply to --dataset synthetic"),
])
def test_bad_flags_are_clear_errors(tmp_path, extra, message, capsys):
    assert message in bad_flags_error(bench_args(tmp_path, "run", "--base-url", "http://127.0.0.1:9", *extra), capsys)


def test_unknown_served_model_needs_a_tokenizer(capsys):
    argv = ["bench", "run", "--base-url", "http://127.0.0.1:9", "--model", SIM, "--rate", "1", *LOOSE_SLO]
    assert "--tokenizer" in bad_flags_error(argv, capsys)
