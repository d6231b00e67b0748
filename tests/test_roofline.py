"""The roofline cost model at paper scale: figures in the range of published measurements (OPT-13B on an
A100-40GB), the hidden cache priced by its recompute, tensor parallelism, the KV budget as vLLM sizes it, and the
real engine driven by it through the same resolve() as a served one."""
from __future__ import annotations

import dataclasses

import pytest

from aptserve.bench.datasets import TraceRequest
from aptserve.cache.tables import CacheKind
from aptserve.cli import build_parser
from aptserve.config import HybridMode
from aptserve.engine_args import EngineArgs
from aptserve.registry import shape_model_config
from aptserve.sampling import SamplingParams
from aptserve.sched.output import CacheConversion, ScheduledRequest, SchedulerOutput
from aptserve.sim.gpus import GIB, gpu_spec
from aptserve.sim.cli import engine_args as sim_engine_args
from aptserve.sim.roofline import RooflineCostModel
from aptserve.sim.simulator import sim_engine, simulate

OPT_13B = shape_model_config("opt-13b")


def step(*requests: tuple[int, int, CacheKind], conversions: tuple[CacheConversion, ...] = ()) -> SchedulerOutput:
    """A step of (new tokens, start position, cache kind) requests, each sampled."""
    scheduled = [ScheduledRequest(str(i), [5] * n, start, kind, [], True, SamplingParams())
                 for i, (n, start, kind) in enumerate(requests)]
    return SchedulerOutput(0, scheduled, conversions=list(conversions))


def model(name: str = "opt-13b", gpu: str = "a100-40gb", tensor_parallel: int = 1) -> RooflineCostModel:
    return RooflineCostModel(shape_model_config(name), gpu_spec(gpu), tensor_parallel)


def test_opt13b_on_an_a100_in_the_range_of_published_figures():
    cost = model()
    assert 23 * GIB < cost.weight_bytes < 25 * GIB
    decode_s = cost.step_time(step((1, 512, CacheKind.KV)))  # memory-bound: the weights once per step
    assert 0.020 < decode_s < 0.035
    batch_s = cost.step_time(step(*[(1, 512, CacheKind.KV)] * 32))  # batching decodes is almost free
    assert batch_s < 1.5 * decode_s
    prefill_s = cost.step_time(step((1024, 0, CacheKind.KV)))  # compute-bound
    assert 0.12 < prefill_s < 0.25
    assert 8 * GIB < cost.kv_cache_bytes(max_num_batched_tokens=2048) < 14 * GIB


def test_the_hidden_cache_costs_its_recompute_and_alpha_is_one_block_of_it():
    cost = model()
    kv_s = cost.step_time(step(*[(1, 1024, CacheKind.KV)] * 16))
    hidden_s = cost.step_time(step(*[(1, 1024, CacheKind.HIDDEN)] * 16))
    assert hidden_s > kv_s
    block = 16
    alpha = cost.alpha_s(OPT_13B, block, "float16", "cuda")
    assert alpha == pytest.approx(OPT_13B.num_layers * cost._recompute_s(block))
    converted = step((1, 256, CacheKind.KV), conversions=(
        CacheConversion("x", 256, CacheKind.HIDDEN, [], CacheKind.KV, []),))
    assert cost.step_time(converted) > cost.step_time(step((1, 256, CacheKind.KV)))


def test_tensor_parallelism_splits_the_weights_and_pays_all_reduces():
    one, two = model("opt-30b", "a100-80gb", 1), model("opt-30b", "a100-80gb", 2)
    decode = step(*[(1, 512, CacheKind.KV)] * 8)
    assert two.step_time(decode) < one.step_time(decode)
    assert two.step_time(decode) > one.step_time(decode) / 2  # the all-reduces and the overhead do not split
    with pytest.raises(ValueError, match="does not fit 1 x a100-40gb"):
        model("opt-66b", "a100-40gb", 1).kv_cache_bytes(2048)
    assert model("opt-66b", "a100-80gb", 4).kv_cache_bytes(2048) > 100 * GIB


def test_a_24_gb_card_holds_opt_6_7b_but_opt_13b_only_across_two():
    """The L4 (24 GB GDDR6, PCIe): OPT-13B's fp16 weights alone are more than one card holds; over PCIe the
    all-reduces of two cost more of a step than over an A100's NVLink."""
    with pytest.raises(ValueError, match="does not fit 1 x l4"):
        model("opt-13b", "l4", 1).kv_cache_bytes(2048)
    assert 4 * GIB < model("opt-6.7b", "l4", 1).kv_cache_bytes(2048) < 10 * GIB
    assert model("opt-13b", "l4", 2).kv_cache_bytes(2048) > 10 * GIB
    l4, a100 = model("opt-13b", "l4", 2), model("opt-13b", "a100-80gb", 2)
    assert l4._all_reduce_s(512) > 5 * a100._all_reduce_s(512)
    decode = step(*[(1, 512, CacheKind.KV)] * 8)  # the weights once per step at 300 GB/s, not 2 TB/s
    assert l4.step_time(decode) > 4 * a100.step_time(decode)


def test_demotion_in_place_pays_for_its_left_inverses_in_kv_memory():
    """OPT-30B on one A100-80GB: the K/V left inverses demotion keeps (a sixth of the layers' weights) come out of
    the KV budget; the simulator sizes a demoting engine's pool with them."""
    cost = model("opt-30b", "a100-80gb", 1)
    m = cost.model
    assert cost.kv_inverse_bytes == m.num_layers * m.hidden_size * 2 * m.kv_dim * 2
    assert 9.8e9 < cost.kv_inverse_bytes < 1e10 and 6 * cost.kv_inverse_bytes == m.num_layers * cost.layer_params * 2
    recompute, demote = cost.kv_cache_bytes(2048), cost.kv_cache_bytes(2048, demote_in_place=True)
    assert recompute - demote == cost.kv_inverse_bytes
    two = model("opt-30b", "a100-80gb", 2)
    assert two.kv_cache_bytes(2048) - two.kv_cache_bytes(2048, demote_in_place=True) == cost.kv_inverse_bytes
    args = build_parser().parse_args(["sim", "--model", "opt-30b", "--gpu", "a100-80gb", "--max-num-batched-tokens",
                                      "2048", "--scheduler", "apt-chunked"])
    budgets = [sim_engine_args(args, "apt-chunked", m, cost, None, preemption_mode=mode).kv_cache_memory
               for mode in ("recompute", "hidden")]
    assert budgets == [recompute, demote]


def test_the_real_engine_runs_on_the_roofline_at_paper_scale():
    cost = model()
    args = EngineArgs(model="opt-13b", dtype="float16", kv_cache_memory=cost.kv_cache_bytes(2048),
                      scheduler="apt-chunked", max_num_seqs=64)
    engine, clock = sim_engine(args, OPT_13B, cost_model=cost)
    assert engine.config.cache.hybrid == HybridMode.ON  # OPT is MHA: the hidden cache is half the size
    assert engine.config.scheduler.alpha_s == pytest.approx(cost.alpha_s(OPT_13B, 16, "float16", "cuda"))
    trace = [TraceRequest("", 300 + 10 * i, 50) for i in range(20)]
    records = simulate(engine, clock, trace, [0.05 * i for i in range(20)])
    assert all(r.ok and r.output_len == 50 for r in records)
    gaps = [b - a for r in records for a, b in zip(r.token_times_s, r.token_times_s[1:])]
    assert 0.02 < min(gaps) and max(gaps) < 1.0  # decode steps of tens of milliseconds, as on the real GPU


def test_the_feed_forward_layer_counts_the_architectures_matrices():
    """Llama's gated layer has three hidden x intermediate matrices (gate, up, down), OPT's two (fc1, fc2)."""
    opt = shape_model_config("opt-125m")
    llama = dataclasses.replace(opt, architecture="llama")
    ffn = opt.hidden_size * opt.intermediate_size
    gpu = gpu_spec("a100-40gb")
    assert RooflineCostModel(llama, gpu).layer_params - RooflineCostModel(opt, gpu).layer_params == ffn


def test_a_step_of_conversions_alone_reads_the_kv_projections_not_the_whole_model():
    cost = model()
    conversion = CacheConversion("r", 1024, CacheKind.HIDDEN, [], CacheKind.KV, [])
    alone_s = cost.step_time(step(conversions=(conversion,))) - cost.step_overhead_s
    # 1,024 rows x 5,120 -> 2 x 5,120 per layer: 107 GFLOP x 40 layers at 60% of 312 TFLOP/s, about 23 ms
    projection_s = 40 * 2 * 1024 * 5120 * 2 * 5120 / (312e12 * 0.6)
    # plus reading the K/V projection weights (3.4 ms), not the whole layers' (20 ms) nor the head's
    assert projection_s <= alone_s < 1.2 * projection_s
    decode_s = cost.step_time(step((1, 512, CacheKind.KV)))
    beside_decode_s = cost.step_time(step((1, 512, CacheKind.KV), conversions=(conversion,)))
    assert beside_decode_s - decode_s <= alone_s  # beside a batch, the K/V weights are read anyway
