"""`aptserve profile` on a real (tiny) engine: every grid step timed, the linear cost model fitted to them within
a stated error, and `aptserve sim --cost-model` pricing steps with the fit."""
from __future__ import annotations

import json

from aptserve.cli import main
from aptserve.sim.executor import LinearCostModel
from aptserve.sim.profile import load_profile
from tests.model_fixtures import save_tiny_llama


def test_profile_fits_the_engine_and_sim_uses_it(tmp_path):
    path = save_tiny_llama(tmp_path / "llama", num_kv_heads=4, tie_word_embeddings=False)  # MHA: hidden too
    out = tmp_path / "profile.json"
    assert main(["profile", "--model", path, "--max-model-len", "256", "--kv-cache-memory", "64M",
                 "--repeats", "1", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    kinds = {point["kind"] for point in result["points"]}
    assert kinds == {"kv", "hidden"} and not result["skipped"]
    assert all(value >= 0 for value in result["coefficients"].values())
    assert result["fit_error"]["mean_relative"] < 0.5
    cost_model = load_profile(str(out))
    assert isinstance(cost_model, LinearCostModel) and cost_model.base_s > 0
    sim_out = tmp_path / "sim.json"
    assert main(["sim", "--model", "default", "--cost-model", str(out), "--dataset", "synthetic", "--prompt-len",
                 "64", "--output-len", "16", "--num-requests", "20", "--rates", "2", "--ttft-slo", "1",
                 "--tbt-slo", "1", "--out", str(sim_out), "--no-progress"]) == 0
    sim = json.loads(sim_out.read_text())
    assert sim["config"]["cost_model"] == {"kind": "LinearCostModel", **result["coefficients"]}
    assert sim["servers"]["apt-chunked"]["points"][0]["completed"] == 20
