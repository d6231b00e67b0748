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


def test_a_served_step_log_records_each_step_and_fits_the_cost_model(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from aptserve.engine import LLMEngine
    from aptserve.engine_args import EngineArgs
    from tests.test_server import running_server

    step_log = tmp_path / "steps.jsonl"
    engine = LLMEngine.from_engine_args(EngineArgs(model="default", kv_cache_memory=64 << 20, max_num_seqs=8))
    prompt_ids = engine.tokenizer("The capital of France is").input_ids
    with running_server(engine, step_log=str(step_log)) as live:
        client = live.client()
        client.completions.create(model="default", prompt=prompt_ids, max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
        with ThreadPoolExecutor(4) as pool:  # batched steps of several rows, for the fit
            list(pool.map(lambda n: client.completions.create(
                model="default", prompt=prompt_ids * n, max_tokens=12, temperature=0,
                extra_body={"ignore_eos": True}), (1, 2, 4, 8)))
        live.wait_idle()
    steps = [json.loads(line) for line in step_log.read_text().splitlines()]
    # The lone request: its prompt in one step, then one decode per step over a context one token longer each time.
    first = steps[:4]
    assert [s["num_prefill_tokens"] for s in first] == [len(prompt_ids), 0, 0, 0]
    assert [s["num_context_tokens"] for s in first] == [len(prompt_ids) + i for i in range(4)]
    assert all(s["num_recompute_tokens"] == 0 and s["forward_s"] > 0 for s in steps)
    out = tmp_path / "profile.json"
    assert main(["profile", "--model", "default", "--from-step-log", str(step_log), "--out", str(out)]) == 0
    fitted = json.loads(out.read_text())
    assert fitted["num_steps"] == len(steps) and fitted["step_overhead_s"] >= 0
    assert fitted["coefficients"]["base_s"] > 0 and fitted["fit_error"]["mean_relative"] < 1.0
