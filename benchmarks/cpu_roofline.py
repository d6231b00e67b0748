"""The CPU's own roofline: measured peak fp32/bf16 GEMM GFLOP/s and memory bandwidth, and each phase of the engine's
decode and prefill steps placed against it, so every optimisation knows its headroom.

Peaks, at 1 thread and at all cores (torch's default thread count, what the engine runs with): GEMM GFLOP/s of
torch.matmul and of the engine's own Linear (packed for oneDNN where it can be), the best of a few shapes; memory
bandwidth of a copy and of a triad (a = b + s * c) over arrays far beyond the L3 cache (read + write bytes counted,
not the write-allocate reads), and the same over cache-sized arrays.

Phases: the default model's runner (built by build_engine_core, fp32) executes real steps (decode: 32 rows at
256- and 1024-token contexts; prefill: one prompt of 256, 1024, 2048 tokens) with perf_counter wrappers put around
its pieces from outside (the Linear instances, RMSNorm, RoPE, paged_attention, the logits head, the sampler, input
preparation); "other" is the step's remainder (Python between the pieces, views, the embedding gather's dispatch).
FLOPs and bytes per phase are analytic, from the shapes: compulsory traffic (weights, activations, K/V read once),
so intensity is each phase's best case. fraction = roofline time / measured time, roofline time = max(FLOPs / peak
GFLOP/s, bytes / DRAM bandwidth), at all cores.

    .venv/bin/python benchmarks/cpu_roofline.py                    # ~3 min on 2 idle cores
    .venv/bin/python benchmarks/cpu_roofline.py --quick --out-dir /tmp/roof   # smoke test, ~40 s

Writes <out-dir>/<name>.json and .png (default cpu_roofline).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks.common import (RESULTS_DIR, cpu_flags, load_average, save_figure, wait_until_idle,  # noqa: E402
                               write_json)

FP32_BYTES = 4
# (M, K, N) of C[M, N] = A[M, K] @ B[K, N], cheapest first: a dtype stops at the first shape it would take too long
# for (bf16 emulated on AVX2 runs ~1 GFLOP/s). The engine's own prefill shapes are among them.
GEMM_SHAPES = ((512, 512, 512), (1024, 1024, 1024), (2048, 576, 1536), (2048, 1536, 576), (2048, 2048, 2048))
QUICK_GEMM_SHAPES = GEMM_SHAPES[:3]
PHASES = ("embedding", "rmsnorm", "qkv_proj", "rope", "attention", "o_proj", "mlp_gate_up", "mlp_down",
          "logits_head", "sampling", "prepare", "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--decode", default="32x256,32x1024", help="ROWSxCONTEXT decode steps, comma-separated")
    parser.add_argument("--prefill", default="256,1024,2048", help="prompt lengths of one-prompt prefill steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per scenario (the fastest is kept)")
    parser.add_argument("--memory-mib", type=int, default=256, help="each bandwidth array (far beyond the L3)")
    parser.add_argument("--cache-mib", type=float, default=2.0, help="each cache-resident bandwidth array")
    parser.add_argument("--min-time-s", type=float, default=0.4, help="time each peak measurement at least this")
    parser.add_argument("--max-call-s", type=float, default=0.6, help="skip GEMM shapes one call would exceed")
    parser.add_argument("--wait-idle-s", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats, smaller arrays (smoke)")
    parser.add_argument("--name", default="cpu_roofline", help="file name of the results")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[cpu_roofline {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- peaks


def best_seconds(fn, min_time_s: float, min_reps: int = 3, max_reps: int = 200) -> float:
    """Fastest of repeated calls after one warm-up (other processes only ever slow a call down)."""
    fn()
    times: list[float] = []
    while len(times) < min_reps or (sum(times) < min_time_s and len(times) < max_reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_call(shape: tuple[int, int, int], dtype: torch.dtype):
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    return lambda: torch.matmul(a, b, out=out)


def engine_linear_call(shape: tuple[int, int, int], dtype: torch.dtype):
    """The engine's Linear (out = x W^T), packed for oneDNN where it can be (fp32 always; bf16 only with bf16
    instructions), else its plain F.linear path: what the engine runs for that dtype on this CPU."""
    from aptserve.model.linear import Linear

    m, k, n = shape
    layer = Linear(k, n, bias=False).to(dtype).requires_grad_(False)
    layer.pack()
    x = torch.randn(m, k).to(dtype)

    def call():
        with torch.inference_mode():
            layer(x)
    return call, layer.packed is not None


def gemm_peak(make_call, dtype: torch.dtype, shapes, args) -> dict:
    """GFLOP/s of each shape (cheapest first), skipping the shapes whose one call would exceed --max-call-s at the
    best rate so far; the best over the shapes is the peak."""
    by_shape, best, extra = {}, 0.0, {}
    for shape in shapes:
        flops = 2.0 * shape[0] * shape[1] * shape[2]
        if best and flops / (best * 1e9) > args.max_call_s:
            by_shape["x".join(map(str, shape))] = None  # too slow to time here
            continue
        call = make_call(shape, dtype)
        if isinstance(call, tuple):
            call, extra["packed"] = call
        gflops = flops / best_seconds(call, args.min_time_s) / 1e9
        by_shape["x".join(map(str, shape))] = round(gflops, 2)
        best = max(best, gflops)
    return {"gflops": round(best, 2), "by_shape_mkn": by_shape, **extra}


def bandwidth(nbytes: int, min_time_s: float) -> dict:
    """GB/s of a copy (2 arrays) and a triad a = b + s * c (3 arrays), each array `nbytes`; small arrays loop so a
    timed call lasts long enough."""
    numel = nbytes // FP32_BYTES
    a, b, c = torch.zeros(numel), torch.ones(numel), torch.full((numel,), 2.0)
    loops = max(1, (64 << 20) // nbytes)

    def copy():
        for _ in range(loops):
            a.copy_(b)

    def triad():
        for _ in range(loops):
            torch.add(b, c, alpha=3.0, out=a)
    copy_gbps = 2 * nbytes * loops / best_seconds(copy, min_time_s) / 1e9
    triad_gbps = 3 * nbytes * loops / best_seconds(triad, min_time_s) / 1e9
    return {"copy_gbps": round(copy_gbps, 2), "triad_gbps": round(triad_gbps, 2),
            "gbps": round(max(copy_gbps, triad_gbps), 2), "array_mib": nbytes / 2**20}


def peaks_at(threads: int, args) -> dict:
    torch.set_num_threads(threads)
    shapes = QUICK_GEMM_SHAPES if args.quick else GEMM_SHAPES
    result = {"threads": threads}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        result[f"{name}_matmul"] = gemm_peak(matmul_call, dtype, shapes, args)
        result[f"{name}_engine_linear"] = gemm_peak(engine_linear_call, dtype, shapes, args)
        result[f"{name}_gflops"] = max(result[f"{name}_matmul"]["gflops"], result[f"{name}_engine_linear"]["gflops"])
        log(f"{threads} thread(s) {name}: matmul {result[f'{name}_matmul']['gflops']:.1f}, engine Linear "
            f"{result[f'{name}_engine_linear']['gflops']:.1f} GFLOP/s")
    result["memory"] = bandwidth(int(args.memory_mib * 2**20), args.min_time_s)
    result["cache"] = bandwidth(int(args.cache_mib * 2**20), args.min_time_s)
    log(f"{threads} thread(s) bandwidth: memory {result['memory']['gbps']:.1f} GB/s, "
        f"cache-sized {result['cache']['gbps']:.1f} GB/s")
    return result


def bf16_support() -> dict:
    """What this CPU does with bf16, from its flags and torch, rather than guessed."""
    flags = set(cpu_flags())
    native = sorted(flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"})
    return {"native_bf16_flags": native, "avx512f": "avx512f" in flags,
            "onednn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "note": ("bf16 GEMMs run on native bf16 instructions (" + ", ".join(native) + ")") if native else
                    ("no avx512_bf16 / AMX: bf16 GEMMs are emulated (converted to fp32 inside the kernel)"
                     + ("; oneDNN still packs bf16 on AVX-512" if "avx512f" in flags else
                        "; without AVX-512 oneDNN cannot pack bf16, the engine's Linear falls back to F.linear"))}


def measure_peaks(args) -> dict:
    all_cores = torch.get_num_threads()
    peaks = {"all_cores_threads": all_cores, "os_cpu_count": os.cpu_count(), "bf16": bf16_support()}
    for threads in sorted({1, all_cores}):
        peaks[f"threads_{threads}"] = peaks_at(threads, args)
    torch.set_num_threads(all_cores)
    top = peaks[f"threads_{all_cores}"]
    peaks["roof"] = {"fp32_gflops": top["fp32_gflops"], "memory_gbps": top["memory"]["gbps"],
                     "cache_gbps": top["cache"]["gbps"], "threads": all_cores,
                     "ridge_flop_per_byte": round(top["fp32_gflops"] / top["memory"]["gbps"], 2)}
    return peaks


# ---------------------------------------------------------------- analytic FLOPs and bytes per phase


@dataclass(frozen=True)
class Geometry:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int

    @classmethod
    def of(cls, config) -> Geometry:
        return cls(config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                   config.intermediate_size, config.vocab_size)


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "decode" or "prefill"
    rows: int
    new_tokens: int  # per row
    start_pos: int  # per row: cached tokens before this step

    @property
    def tokens(self) -> int:
        return self.rows * self.new_tokens


def gemm_cost(tokens: int, k: int, n: int, extra_operands: int = 0) -> tuple[float, float]:
    """FLOPs and bytes of out[T, n] = x[T, k] W^T (+ a fused [T, n] operand): the weight read once."""
    flops = 2.0 * tokens * k * n
    return flops, FP32_BYTES * (k * n + tokens * k + tokens * n * (1 + extra_operands))


def attention_cost(g: Geometry, s: Scenario) -> tuple[float, float]:
    """Per layer: QK^T and PV (4 * heads * dim FLOPs per query-key pair, causal pairs only; softmax not counted);
    bytes: q read, out written, cached K/V read, fresh K/V read and written to the cache."""
    pairs = s.rows * (s.new_tokens * s.start_pos + s.new_tokens * (s.new_tokens + 1) / 2)
    flops = 4.0 * g.heads * g.head_dim * pairs
    kv_row = 2 * g.kv_heads * g.head_dim
    values = (2 * s.tokens * g.heads * g.head_dim + s.rows * s.start_pos * kv_row + 2 * s.tokens * kv_row)
    return g.layers * flops, g.layers * FP32_BYTES * values


def gemm_phase_costs(g: Geometry, s: Scenario) -> dict[str, tuple[float, float]]:
    t, qkv_out = s.tokens, (g.heads + 2 * g.kv_heads) * g.head_dim
    gate = gemm_cost(t, g.hidden, g.inter)
    up = gemm_cost(t, g.hidden, g.inter, extra_operands=1)  # (x U^T) * silu(gate)
    per_layer = {"qkv_proj": gemm_cost(t, g.hidden, qkv_out),
                 "o_proj": gemm_cost(t, g.heads * g.head_dim, g.hidden, extra_operands=1),  # + residual
                 "mlp_gate_up": (gate[0] + up[0], gate[1] + up[1]),
                 "mlp_down": gemm_cost(t, g.inter, g.hidden, extra_operands=1)}  # + residual
    return {name: (g.layers * f, g.layers * b) for name, (f, b) in per_layer.items()}


def phase_costs(g: Geometry, s: Scenario) -> dict[str, tuple[float, float]]:
    """(FLOPs, bytes) of each phase of one step; prepare and other move nothing countable."""
    t, sampled = s.tokens, s.rows
    rope_values = t * (g.heads + g.kv_heads) * g.head_dim
    costs = gemm_phase_costs(g, s)
    costs.update({
        "embedding": (0.0, FP32_BYTES * 2 * t * g.hidden),
        "rmsnorm": ((2 * g.layers + 1) * 4.0 * t * g.hidden,  # square, sum, scale, weight
                    (2 * g.layers + 1) * FP32_BYTES * (2 * t * g.hidden + g.hidden)),
        # One complex multiply (6 FLOPs) per q/k pair; the [T, D/2] complex64 table is read by every layer.
        "rope": (g.layers * 3.0 * rope_values,
                 g.layers * FP32_BYTES * (2 * rope_values + t * g.head_dim) + FP32_BYTES * 2 * t * g.head_dim),
        "attention": attention_cost(g, s),
        "logits_head": gemm_cost(sampled, g.hidden, g.vocab),
        "sampling": (float(sampled * g.vocab), FP32_BYTES * sampled * g.vocab),  # greedy argmax
        "prepare": (0.0, 0.0), "other": (0.0, 0.0)})
    return costs


# ---------------------------------------------------------------- the engine's step, timed piece by piece


class PhaseTimer:
    """Seconds per phase of the current step, accumulated by the wrappers `wrap` makes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, phase: str, fn):
        seconds = self.seconds

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - start
        return timed


def instrument(runner, timer: PhaseTimer) -> contextlib.ExitStack:
    """Wrap the pieces of a Llama-family runner in place (instance attributes and the decoder module's imports),
    undone when the returned stack closes; no engine file changes and the pieces' own code runs unchanged."""
    from aptserve.model import llama

    model = runner.model
    if not isinstance(model, llama.LlamaForCausalLM):
        raise SystemExit(f"cpu_roofline times Llama-family models only, not {type(model).__name__}")
    stack = contextlib.ExitStack()

    def patch(target, name: str, phase: str) -> None:
        stack.enter_context(mock.patch.object(target, name, timer.wrap(phase, getattr(target, name))))
    patch(llama, "paged_attention", "attention")
    patch(llama, "apply_rope", "rope")
    patch(model, "rope", "rope")  # the step's RoPE table
    patch(model.model.embed_tokens, "forward", "embedding")
    patch(model.model.norm, "forward", "rmsnorm")
    patch(model.logits_head, "forward", "logits_head")
    patch(runner, "prepare_inputs", "prepare")
    patch(runner, "_sample", "sampling")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            patch(norm, "forward", "rmsnorm")
        patch(attn.qkv_proj, "forward", "qkv_proj")
        patch(attn.o_proj, "forward_add", "o_proj")
        patch(mlp.gate_proj, "forward", "mlp_gate_up")
        patch(mlp.up_proj, "forward_mul", "mlp_gate_up")
        patch(mlp.down_proj, "forward_add", "mlp_down")
    return stack


def parse_scenarios(args) -> list[Scenario]:
    scenarios = []
    for spec in filter(None, args.decode.split(",")):
        rows, context = map(int, spec.lower().split("x"))
        scenarios.append(Scenario(f"decode x{rows} ctx{context}", "decode", rows, 1, context - 1))
    for length in filter(None, args.prefill.split(",")):
        scenarios.append(Scenario(f"prefill {int(length)}", "prefill", 1, int(length), 0))
    return scenarios


def build_runner(args, scenarios: list[Scenario]):
    """The engine core's own runner (build_engine_core, fp32, its default kernels), with a pool that holds the
    largest scenario; and a cache manager of our own to hand out the scenarios' units."""
    from aptserve.cache.manager import CacheManager
    from aptserve.core.engine_core import build_engine_core
    from aptserve.engine_args import EngineArgs
    from aptserve.registry import resolve_model

    from benchmarks.common import fp32_kv_bytes_per_token

    max_len = max(s.start_pos + s.new_tokens for s in scenarios)
    max_tokens = max(s.rows * (s.start_pos + s.new_tokens + 16) for s in scenarios)
    kv_bytes = int(1.05 * max_tokens * fp32_kv_bytes_per_token(resolve_model(args.model)))
    core = build_engine_core(EngineArgs(model=args.model, dtype="float32", kv_cache_memory=kv_bytes,
                                        max_model_len=max(max_len, 256), hybrid_cache="off",
                                        max_num_seqs=max(s.rows for s in scenarios)))
    return core.executor, CacheManager.from_config(core.config.cache), core.config


def time_scenario(runner, manager, timer: PhaseTimer, scenario: Scenario, repeats: int) -> dict:
    """The fastest of `repeats` executions of the step (after two warm-ups), with its phase seconds."""
    from aptserve.cache.tables import CacheKind
    from aptserve.sampling import SamplingParams
    from aptserve.sched.output import ScheduledRequest, SchedulerOutput

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    ids = [f"roof-{row}" for row in range(scenario.rows)]
    scheduled = []
    try:
        for request_id in ids:
            if not manager.allocate(request_id, CacheKind.KV, scenario.start_pos + scenario.new_tokens):
                raise RuntimeError(f"{scenario.name}: the pool cannot hold the scenario")
            token_ids = [(17 + 31 * i) % 10_000 + 100 for i in range(scenario.new_tokens)]
            scheduled.append(ScheduledRequest(request_id, token_ids, scenario.start_pos, CacheKind.KV,
                                              manager.unit_ids(request_id), True, params))
        steps = []
        for step in range(repeats + 2):
            timer.seconds.clear()
            start = time.perf_counter()
            runner.execute(SchedulerOutput(step, scheduled))
            steps.append((time.perf_counter() - start, dict(timer.seconds)))
    finally:
        for request_id in ids:
            manager.free(request_id)
    total, phases = min(steps[2:], key=lambda step: step[0])
    phases["other"] = max(0.0, total - sum(phases.values()))
    return {"step_s": total, "phase_s": phases, "all_steps_s": [round(s, 6) for s, _ in steps[2:]]}


# ---------------------------------------------------------------- the roofline rows, plot and table


def roofline_row(seconds: float, step_s: float, flops: float, nbytes: float, roof: dict) -> dict:
    """A phase against the roof: achieved rates, the bound at its intensity and the fraction of it reached."""
    peak, bandwidth_gbps = roof["fp32_gflops"], roof["memory_gbps"]
    intensity = flops / nbytes if nbytes else None
    roof_s = max(flops / (peak * 1e9), nbytes / (bandwidth_gbps * 1e9))
    bound = min(peak, intensity * bandwidth_gbps) if intensity else None
    return {"ms": round(1e3 * seconds, 3), "share": round(seconds / step_s, 4), "flops": flops, "bytes": nbytes,
            "intensity_flop_per_byte": round(intensity, 3) if intensity is not None else None,
            "achieved_gflops": round(flops / seconds / 1e9, 2) if seconds and flops else None,
            "achieved_gbps": round(nbytes / seconds / 1e9, 2) if seconds and nbytes else None,
            "bound_gflops": round(bound, 2) if bound is not None else None,
            "bound_by": None if not roof_s else ("compute" if flops / peak > nbytes / bandwidth_gbps else "memory"),
            "roofline_ms": round(1e3 * roof_s, 3),
            "fraction_of_roofline": round(roof_s / seconds, 4) if seconds and roof_s else None}


def scenario_rows(geometry: Geometry, scenario: Scenario, timed: dict, roof: dict) -> dict:
    costs = phase_costs(geometry, scenario)
    phases = {name: roofline_row(timed["phase_s"].get(name, 0.0), timed["step_s"], *costs[name], roof)
              for name in PHASES}
    flops, nbytes = sum(f for f, _ in costs.values()), sum(b for _, b in costs.values())
    step = roofline_row(timed["step_s"], timed["step_s"], flops, nbytes, roof)
    return {"kind": scenario.kind, "rows": scenario.rows, "new_tokens_per_row": scenario.new_tokens,
            "context_tokens": scenario.start_pos + scenario.new_tokens, "step": step, "phases": phases,
            "timed_steps_s": timed["all_steps_s"]}


def print_table(results: dict) -> None:
    for name, result in results.items():
        print(f"\n{name}: step {result['step']['ms']:.1f} ms, {result['step']['fraction_of_roofline']:.1%} of its "
              f"roofline time")
        print(f"  {'phase':<12} {'ms':>8} {'share':>6} {'FLOP/B':>7} {'GFLOP/s':>8} {'GB/s':>7} {'bound':>8} "
              f"{'fraction':>8}")
        for phase, row in sorted(result["phases"].items(), key=lambda item: -item[1]["ms"]):
            def fmt(value, spec):
                return format(value, spec) if value is not None else "-"
            print(f"  {phase:<12} {row['ms']:>8.2f} {row['share']:>6.1%} "
                  f"{fmt(row['intensity_flop_per_byte'], '>7.2f')} {fmt(row['achieved_gflops'], '>8.1f')} "
                  f"{fmt(row['achieved_gbps'], '>7.1f')} {fmt(row['bound_gflops'], '>8.1f')} "
                  f"{fmt(row['fraction_of_roofline'], '>8.1%')}")


SCENARIO_MARKERS = {"decode": ("o", "s", "p", "h"), "prefill": ("^", "v", "<", ">", "D")}


def plot_roofline(ax, results: dict, peaks: dict) -> None:
    import matplotlib
    import numpy as np

    roof = peaks["roof"]
    x = np.logspace(-2, 3, 200)
    ax.plot(x, np.minimum(roof["fp32_gflops"], x * roof["memory_gbps"]), color="black", lw=2,
            label=f"fp32 roof: {roof['fp32_gflops']:.0f} GFLOP/s, DRAM {roof['memory_gbps']:.0f} GB/s")
    ax.plot(x, np.minimum(roof["fp32_gflops"], x * roof["cache_gbps"]), color="gray", lw=1, ls="--",
            label=f"cache-resident {roof['cache_gbps']:.0f} GB/s")
    one = peaks.get("threads_1")
    if one and roof["threads"] != 1:
        ax.plot(x, np.minimum(one["fp32_gflops"], x * one["memory"]["gbps"]), color="black", lw=1, ls=":",
                label=f"1 thread: {one['fp32_gflops']:.0f} GFLOP/s, {one['memory']['gbps']:.0f} GB/s")
    colors = {phase: color for phase, color in zip(PHASES, matplotlib.cm.tab10.colors)}
    used = defaultdict(int)
    for name, result in results.items():
        marker = SCENARIO_MARKERS[result["kind"]][used[result["kind"]] % 5]
        used[result["kind"]] += 1
        for phase, row in result["phases"].items():
            if row["achieved_gflops"] and row["intensity_flop_per_byte"]:
                decode = result["kind"] == "decode"
                ax.scatter(row["intensity_flop_per_byte"], row["achieved_gflops"], marker=marker, s=50,
                           facecolors=colors[phase] if decode else "none",
                           edgecolors="black" if decode else colors[phase], linewidths=0.5 if decode else 1.5)
        ax.scatter([], [], marker=marker, facecolors="black" if result["kind"] == "decode" else "none",
                   edgecolors="black", label=name)
    for phase in PHASES[:10]:  # prepare and other have no FLOPs: no point
        ax.scatter([], [], marker="o", color=colors[phase], label=phase)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte, compulsory traffic)",
           ylabel="GFLOP/s", title="phases against the fp32 roofline (filled: decode, hollow: prefill)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=4, loc="upper left", bbox_to_anchor=(0, -0.12))


def plot_shares(ax, results: dict) -> None:
    import matplotlib

    names = list(results)
    left = [0.0] * len(names)
    for phase, color in zip(PHASES, matplotlib.cm.tab10.colors + ("#bbbbbb", "#666666")):
        shares = [100 * results[name]["phases"][phase]["share"] for name in names]
        ax.barh(names, shares, left=left, color=color, label=phase)
        left = [a + b for a, b in zip(left, shares)]
    for i, name in enumerate(names):
        ax.annotate(f"{results[name]['step']['ms']:.0f} ms", (101, i), va="center", fontsize=8)
    ax.set(xlim=(0, 115), xlabel="% of the step", title="each step's time by phase")
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncol=4, loc="upper left", bbox_to_anchor=(0, -0.12))


def plot(path: Path, payload: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 7.5), gridspec_kw={"width_ratios": [1.3, 1]})
    plot_roofline(left, payload["scenarios"], payload["peaks"])
    plot_shares(right, payload["scenarios"])
    save_figure(fig, path, payload["title"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.memory_mib, args.min_time_s, args.repeats = min(args.memory_mib, 128), 0.15, min(args.repeats, 2)
    started = time.perf_counter()
    busy = wait_until_idle(0.1, args.wait_idle_s, log=log)
    load_before = load_average()
    scenarios = parse_scenarios(args)
    runner, manager, config = build_runner(args, scenarios)  # first: it sets the engine's thread count
    peaks = measure_peaks(args)
    timer, results = PhaseTimer(), {}
    geometry = Geometry.of(config.model)
    with instrument(runner, timer):
        for scenario in scenarios:
            timed = time_scenario(runner, manager, timer, scenario, args.repeats)
            results[scenario.name] = scenario_rows(geometry, scenario, timed, peaks["roof"])
            log(f"{scenario.name}: {1e3 * timed['step_s']:.1f} ms")
    print_table(results)
    payload = finish_payload(args, config, peaks, results, busy, load_before, time.perf_counter() - started)
    out_dir = Path(args.out_dir)
    json_path = write_json(out_dir / f"{args.name}.json", payload)
    plot(out_dir / f"{args.name}.png", payload)
    log(f"wrote {json_path} in {payload['duration_s']:.0f} s")
    return 0


def finish_payload(args, config, peaks: dict, results: dict, busy: float, load_before, duration_s: float) -> dict:
    from aptserve.model.cpu_kernels import cpu_kernels

    roof = peaks["roof"]
    return {"benchmark": "cpu_roofline", "config": {**vars(args), "model_dir": config.model.path},
            "engine": {"dtype": "float32", "threads": torch.get_num_threads(),
                       "paged_decode_kernel": cpu_kernels() is not None,
                       "block_size": config.cache.block_size},
            "other_cpu_before": busy, "load_average_before": load_before, "load_average_after": load_average(),
            "duration_s": round(duration_s, 1), "peaks": peaks, "scenarios": results,
            "title": (f"{config.model.path.rstrip('/').split('/')[-1]} fp32 on {roof['threads']} threads; roof: "
                      f"{roof['fp32_gflops']:.0f} GFLOP/s fp32, {roof['memory_gbps']:.0f} GB/s DRAM "
                      f"(ridge {roof['ridge_flop_per_byte']:.1f} FLOP/B)")}


if __name__ == "__main__":
    sys.exit(main())
