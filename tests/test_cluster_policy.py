"""The routing policies on hand-made replica snapshots: what apt-slo predicts and picks, the booking ledger, the
load-based baselines and shedding. Pure: no engine, no Ray."""
from __future__ import annotations

import dataclasses
import math

import pytest

from aptserve.cluster.policy import (AptSlo, Ledger, LeastLoad, PowerOfTwo, ReplicaSnapshot, RoundRobin, RouteRequest,
                                     load_score, make_policy, predict)
from aptserve.sched.step_cost import StepCostModel

COST = StepCostModel(base_s=0.02, per_token_s=0.0005, per_attention_s=1e-7)
IDLE = ReplicaSnapshot("idle", 0.0, num_running=0, num_waiting=0, waiting_tokens=0, running_context_tokens=0,
                       free_units=2000, total_units=2000, block_size=16, units_per_hidden_block=0,
                       max_step_tokens=512, step_cost=COST)
REQUEST = RouteRequest(prompt_len=200, max_tokens=100, ttft_slo_s=0.5, tbt_slo_s=0.1)


def replica(name: str, **changes) -> ReplicaSnapshot:
    return dataclasses.replace(IDLE, replica_id=name, **changes)


def test_an_idle_replica_is_predicted_from_its_step_cost():
    prediction = predict(IDLE, REQUEST)
    assert prediction.ttft_s == pytest.approx(COST.predict(200, 200 * 201 / 2))  # one step holds the prompt
    assert prediction.tbt_s == pytest.approx(COST.predict(1, 200))
    assert prediction.slack(REQUEST) > 0.5


def test_apt_slo_avoids_the_queued_replica_and_then_the_slow_one():
    queued = replica("queued", num_waiting=6, waiting_tokens=3000, num_running=20, running_context_tokens=8000)
    busy = replica("busy", num_running=60, running_context_tokens=30000)
    assert predict(queued, REQUEST).ttft_s > 3 * predict(busy, REQUEST).ttft_s
    assert AptSlo().choose([queued, busy, replica("free")], REQUEST) == "free"
    assert AptSlo().choose([queued, busy], REQUEST) == "busy"


def test_memory_short_replicas_wait_unless_hidden_rows_fit():
    blocks = math.ceil(300 / 16)
    full = replica("full", free_units=2 * blocks - 1)
    assert predict(full, REQUEST).ttft_s == math.inf
    hybrid = replica("hybrid", free_units=2 * blocks - 1, units_per_hidden_block=1, alpha_s=0.001)
    assert predict(hybrid, REQUEST).ttft_s < 1
    assert predict(hybrid, REQUEST).tbt_s == pytest.approx(predict(IDLE, REQUEST).tbt_s + 0.001 * blocks)
    assert AptSlo().choose([full, hybrid], REQUEST) == "hybrid"
    assert AptSlo().choose([full, hybrid, replica("roomy")], REQUEST) == "roomy"  # no recompute beats some


def test_ties_go_to_the_replica_with_more_free_memory():
    assert AptSlo().choose([replica("a", free_units=900), replica("b", free_units=1000)], REQUEST) == "b"


def test_a_busy_replica_whose_own_fit_is_a_little_faster_does_not_win_on_noise():
    """Each replica predicts with its own fitted step cost; fits of the same machine differ by a few ms."""
    quicker_fit = dataclasses.replace(COST, base_s=COST.base_s - 0.001)
    busy = replica("busy", num_running=1, running_context_tokens=40, free_units=1900, step_cost=quicker_fit)
    idle = replica("idle", free_units=1800)  # less free memory: prefixes it cached for earlier requests
    assert predict(busy, REQUEST).slack(REQUEST) > predict(idle, REQUEST).slack(REQUEST)
    assert AptSlo().choose([busy, idle], REQUEST) == "idle"
    # a real difference still decides: a fit 20 ms quicker per step beats the memory held by one request
    much_quicker = dataclasses.replace(COST, base_s=COST.base_s - 0.02)
    assert AptSlo().choose([replica("busy", num_running=1, free_units=1900, step_cost=much_quicker), idle],
                           REQUEST) == "busy"


def test_a_replica_not_yet_fitted_is_priced_by_a_fitted_peer_not_by_the_prior():
    fitted = StepCostModel(base_s=0.036, per_token_s=0.0016, per_attention_s=0.0)
    idle = replica("idle", step_cost=fitted, step_cost_fitted=True)
    busy = replica("busy", num_running=1, running_context_tokens=40, free_units=1990)  # still the prior (0.02 s)
    assert predict(busy, REQUEST).slack(REQUEST) > predict(idle, REQUEST).slack(REQUEST) + 0.05
    assert AptSlo().choose([busy, idle], REQUEST) == "idle"
    # with no fitted replica, the prior prices them all
    assert AptSlo().choose([busy, replica("idle")], REQUEST) == "idle"


def test_the_ledger_adds_what_was_sent_since_the_last_poll():
    ledger = Ledger()
    ledger.book("idle", "a", REQUEST)
    ledger.book("idle", "b", REQUEST)
    view = ledger.view(IDLE)
    assert (view.num_waiting, view.waiting_tokens) == (2, 400)
    assert view.free_units == IDLE.free_units - 2 * 2 * math.ceil(300 / 16)
    assert predict(view, REQUEST).ttft_s > predict(IDLE, REQUEST).ttft_s
    assert ledger.view(replica("other")) == replica("other")
    ledger.polled("idle")
    assert ledger.view(IDLE) == IDLE


def test_a_request_that_finishes_before_the_next_poll_leaves_the_ledger():
    ledger = Ledger()
    ledger.book("idle", "a", REQUEST)
    ledger.book("idle", "b", REQUEST)
    ledger.finished("idle", "a")
    ledger.finished("idle", "unknown")  # booked before the last poll: nothing to take back
    assert ledger.view(IDLE).num_waiting == 1
    ledger.finished("idle", "b")
    assert ledger.view(IDLE) == IDLE


def test_load_based_baselines():
    light, heavy = replica("light", num_running=9), replica("heavy", num_waiting=3)  # 9 < 4 x 3
    assert load_score(heavy) == 12 and LeastLoad().choose([heavy, light], REQUEST) == "light"
    rr = RoundRobin()
    names = [rr.choose([light, heavy], REQUEST) for _ in range(4)]
    assert names == ["light", "heavy", "light", "heavy"]
    replicas = [replica(str(i), num_running=i) for i in range(8)]
    first, second = PowerOfTwo(seed=3), PowerOfTwo(seed=3)
    picks = [first.choose(replicas, REQUEST) for _ in range(50)]
    assert picks == [second.choose(replicas, REQUEST) for _ in range(50)]
    assert "7" not in picks  # the most loaded replica never wins a pair
    assert len(set(picks)) > 3


def test_shedding_refuses_what_no_replica_can_serve_in_time():
    swamped = replica("swamped", num_waiting=40, waiting_tokens=40000, num_running=100, running_context_tokens=60000)
    assert AptSlo(shed=True).choose([swamped], REQUEST) is None
    assert AptSlo(shed=False).choose([swamped], REQUEST) == "swamped"
    assert AptSlo(shed=True).choose([swamped, IDLE], REQUEST) == "idle"
    with pytest.raises(ValueError, match="only the apt-slo router"):
        make_policy("pow2", shed=True)
    with pytest.raises(ValueError, match="unknown router"):
        make_policy("random")


def test_when_every_replica_looks_full_the_lightest_load_gets_the_request():
    """A slow poll plus the ledger's reservations can leave every replica predicted to wait for memory; then the
    router must still spread requests, not send them all to one replica."""
    full = [replica(name, free_units=0, num_waiting=waiting) for name, waiting in (("a", 3), ("b", 1), ("c", 2))]
    assert all(predict(r, REQUEST).ttft_s == math.inf for r in full)
    assert AptSlo().choose(full, REQUEST) == "b"
