"""The cluster simulator: N real engines on their own simulated clocks behind the routing policies, driven by
`aptserve sim --replicas N --router R`."""
from __future__ import annotations

import json

import pytest

from aptserve.cli import main
from tests.test_cli_errors import bad_flags_error

ARGS = ["sim", "--model", "opt-13b", "--gpu", "a100-40gb", "--dataset", "sharegpt", "--num-requests", "120",
        "--ttft-slo", "0.25", "--tbt-slo", "0.1", "--slo-aware", "--replicas", "4", "--no-progress"]


def run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "sim.json"
    assert main([*ARGS, *extra, "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("router", ["round-robin", "least-load", "pow2", "apt-slo"])
def test_every_request_is_served_by_some_replica_and_runs_repeat(tmp_path, router):
    first = run(tmp_path, "--rate", "12", "--router", router)
    point = first["servers"]["apt-chunked"]["points"][0]
    assert point["completed"] == 120 and sum(point["sent_per_replica"]) == 120
    assert min(point["sent_per_replica"]) > 0
    if router == "round-robin":
        assert point["sent_per_replica"] == [30, 30, 30, 30]
    second = run(tmp_path, "--rate", "12", "--router", router)
    assert second["servers"] == first["servers"]


def test_fresh_snapshots_spread_a_burst_that_stale_ones_pile_up(tmp_path):
    """least-load on snapshots polled every 10 s sees the same idle replica for a whole burst, unless the router's
    ledger counts what it sent; with fresh snapshots it never needs to."""
    fresh = run(tmp_path, "--rate", "40", "--cv", "4", "--router", "least-load", "--snapshot-staleness-s", "0")
    stale = run(tmp_path, "--rate", "40", "--cv", "4", "--router", "least-load", "--snapshot-staleness-s", "10")
    for result in (fresh, stale):
        sent = result["servers"]["apt-chunked"]["points"][0]["sent_per_replica"]
        assert max(sent) - min(sent) <= 20  # the ledger keeps a stale router balanced too
    fresh_ttft = fresh["servers"]["apt-chunked"]["points"][0]["p99_ttft_s"]
    assert fresh_ttft <= stale["servers"]["apt-chunked"]["points"][0]["p99_ttft_s"] * 1.5


def test_shedding_fails_requests_fast_with_a_clear_error(tmp_path, capsys):
    result = run(tmp_path, "--rate", "400", "--router", "apt-slo", "--shed", "--snapshot-staleness-s", "0")
    point = result["servers"]["apt-chunked"]["points"][0]
    assert point["failed"] > 0 and point["completed"] + point["failed"] == 120
    assert any("shed by the router" in error for error in point["errors"])
    argv = [*ARGS, "--rate", "4", "--router", "pow2", "--shed", "--out", str(tmp_path / "x.json")]
    assert "--shed needs --router apt-slo" in bad_flags_error(argv, capsys)
