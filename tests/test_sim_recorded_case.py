"""The simulator keeps matching a served run it was validated on: `benchmarks/sim_validation.py --record-case` kept
the served figures (ShareGPT at three rates on this CPU) and everything `aptserve sim` needs to replay them (the
profile's coefficients and the served path's terms, calibrated on another seed). A change to the engine, the
policies or the simulator that moves the simulated latencies away from the served ones fails here. The tolerance is
the validation target, or the served runs' own spread (repeated runs of the same trace) where that is wider."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aptserve.cli import main

CASES = sorted((Path(__file__).parent / "data").glob("sim_recorded_case*.json"))
REL_TOLERANCE = 0.15  # on p50 and p90 of TTFT and of the per-request P99 TBT
ATTAINMENT_TOLERANCE = 0.05


@pytest.mark.parametrize("case_path", CASES, ids=[p.stem for p in CASES])
def test_simulated_latencies_stay_within_tolerance_of_the_served_ones(case_path, tmp_path):
    case = json.loads(case_path.read_text())
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({**case["profile"], "points": []}))
    out = tmp_path / "sim.json"
    assert main(["sim", *case["sim_flags"], "--cost-model", str(profile), "--out", str(out)]) == 0
    scheduler = case["sim_flags"][case["sim_flags"].index("--scheduler") + 1]
    points = json.loads(out.read_text())["servers"][scheduler]["points"]
    assert [p["rate"] for p in points] == [row["rate"] for row in case["served"]]
    for point, served in zip(points, case["served"]):
        tolerance = max(ATTAINMENT_TOLERANCE, served["attainment_spread"])
        assert point["attainment"] == pytest.approx(served["attainment_real"], abs=tolerance), point["rate"]
        for metric in ("ttft_s", "p99_tbt_s"):
            values = [v for v in point["requests"][metric] if v is not None]
            for q in (50, 90):
                key = f"{metric}_p{q}"
                simulated, measured = float(np.percentile(values, q)), served[key]
                tolerance = max(REL_TOLERANCE, served[f"{key}_rel_spread"])
                assert simulated == pytest.approx(measured, rel=tolerance), (point["rate"], metric, q)


def test_a_recorded_case_is_present():
    assert CASES, "tests/data/sim_recorded_case*.json: record one with benchmarks/sim_validation.py --record-case"
