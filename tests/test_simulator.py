"""The simulator replays a trace through the real engine step on a simulated clock."""
import pytest

from aptserve.bench.arrivals import gamma_send_offsets_s
from aptserve.bench.datasets import TraceRequest
from aptserve.bench.metrics import summarize
from aptserve.config import ModelConfig
from aptserve.sim.simulator import sim_engine, simulate
from tests.sim_fixtures import sim_args

# 16 layers: the recompute scratch (one layer's K/V of a 1,024-token context) is 8 pool units.
MHA = ModelConfig(path="sim", architecture="opt", num_layers=16, hidden_size=64, num_heads=4, num_kv_heads=4,
                  head_dim=16, vocab_size=1000, max_model_len=1024)


def make_engine(policy: str, num_units: int, hybrid: str = "on"):
    args = sim_args(MHA, num_units, block_size=16, hybrid_cache=hybrid, scheduler=policy,
                    max_num_batched_tokens=256, alpha=3.2e-4, ttft_slo=1.0, tbt_slo=0.2)
    return sim_engine(args, MHA)


def trace(num_requests: int):
    return [TraceRequest("", 20 + (37 * i) % 200, 10 + (53 * i) % 120) for i in range(num_requests)]


@pytest.mark.parametrize("policy", ["fcfs", "chunked", "apt", "apt-chunked"])
def test_every_request_of_the_trace_completes_with_its_length(policy):
    engine, clock = make_engine(policy, num_units=120)
    requests = trace(80)
    records = simulate(engine, clock, requests, gamma_send_offsets_s(80, rate=20.0, cv=2.0, seed=1))
    assert all(r.ok for r in records)
    assert [r.output_len for r in records] == [t.output_len for t in requests]
    for record in records:
        assert record.send_s <= record.first_token_s == record.token_times_s[0]
    summary = summarize(records, ttft_slo_s=1.0, tbt_slo_s=0.2, duration_s=clock.now())
    assert summary["completed"] == 80
    assert engine.cache.num_free_units == engine.cache.num_units


def test_oversize_request_is_recorded_as_a_failure_not_a_hang():
    engine, clock = make_engine("apt", num_units=10)  # and the scratch's 8: 144 tokens as KV, 160 as hidden
    records = simulate(engine, clock, [TraceRequest("", 100, 100), TraceRequest("", 20, 20)], [0.0, 0.0])
    assert not records[0].ok and "kv_cache_memory" in records[0].error
    assert records[1].ok and records[1].output_len == 20
