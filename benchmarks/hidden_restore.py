"""Restoring a request's K/V from its hidden rows against recomputing it: time per token, on this CPU and in the
roofline model of the paper's GPUs.

A request that leaves memory can come back two ways. Recompute: prefill its prompt and outputs again (every layer's
projections, attention and MLP, and the head). Restore: if its hidden rows (each layer's attention input) were
kept, project them to K/V once (one GEMM of hidden x 2 kv_dim per layer; no attention, no MLP): the engine's
HIDDEN -> KV conversion, `model/hidden.py`. Kept where? In the same pool they take what a hidden request takes
(half of KV on MHA), so they free only half; kept off the pool (host memory on a GPU, the HCache design), they
cost a copy back too. A request that ran as KV has no hidden rows, but on MHA its K/V determine them: the engine's
preemption by demotion solves K/V back to x in place (`linear.kv_left_inverse`, one GEMM of 2 kv_dim x hidden per
layer), timed here as "demote". This benchmark prices each:

1. On this CPU, the real ModelRunner on the opt-125m and opt-350m shapes (MHA; seeded random weights, fp32): one
   step converting a request of N hidden tokens to KV, one demoting N tokens of K/V to hidden rows, and one step
   prefilling N tokens from scratch (the least a recompute costs), median of --repeats each.
2. In the roofline model (`sim/roofline.py`) of OPT-13B on an A100-40GB, OPT-30B on an A100-80GB and OPT-66B on two
   (fp16): the same two steps alone and beside a running batch of 32 decodes (what each adds to that step), and
   what copying the request's state back from host memory adds at --pcie-gb-s per GPU (hidden rows: one row of
   hidden per layer per token, whole on every GPU; KV swap: 2 x kv_dim, split across the GPUs), the copy before
   the projection or overlapped with it layer by layer (HCache's pipeline).

    .venv/bin/python benchmarks/hidden_restore.py                  # ~3 min on 2 idle cores
    .venv/bin/python benchmarks/hidden_restore.py --models opt-125m --tokens 128 --repeats 2 --out-dir /tmp/hr

Writes <out-dir>/hidden_restore.json and .png.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from aptserve import SamplingParams  # noqa: E402
from aptserve.cache import CacheKind, CacheManager  # noqa: E402
from aptserve.cache.geometry import hidden_units_per_block  # noqa: E402
from aptserve.registry import load_model_config, resolve_model  # noqa: E402
from aptserve.runner import ModelRunner  # noqa: E402
from aptserve.sched.output import CacheConversion, ScheduledRequest, SchedulerOutput  # noqa: E402
from aptserve.sim.cli import model_config as sim_model_config  # noqa: E402
from aptserve.sim.gpus import gpu_spec  # noqa: E402
from aptserve.sim.roofline import RooflineCostModel  # noqa: E402
from benchmarks.common import RESULTS_DIR, load_average, write_json  # noqa: E402

BLOCK_SIZE = 16
GREEDY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
GPU_SETUPS = (("opt-13b", "a100-40gb", 1), ("opt-30b", "a100-80gb", 1), ("opt-66b", "a100-80gb", 2))
# A running batch a restore or a recompute joins on the GPU: 32 decodes at a 512-token context.
BATCH = tuple(ScheduledRequest(f"b{i}", [5], 512, CacheKind.KV, [], True, GREEDY) for i in range(32))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="opt-125m,opt-350m")
    parser.add_argument("--tokens", default="256,1024", help="context lengths restored or recomputed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pcie-gb-s", type=float, default=25.0,
                        help="host <-> GPU copy bandwidth (GB/s) for state kept off the GPU (PCIe 4.0 x16)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def restore_step(manager: CacheManager, num_tokens: int) -> SchedulerOutput:
    """A request holding `num_tokens` hidden rows converted to KV in place (nothing else in the step)."""
    assert manager.allocate("r", CacheKind.HIDDEN, num_tokens)
    src, dst = manager.convert("r", CacheKind.KV, num_tokens)
    return SchedulerOutput(0, conversions=[CacheConversion("r", num_tokens, CacheKind.HIDDEN, src, CacheKind.KV,
                                                           dst)])


def demote_step(manager: CacheManager, num_tokens: int) -> SchedulerOutput:
    """A request holding `num_tokens` of K/V demoted to hidden rows in place: K/V solved back to x (the engine's
    preemption by demotion, --preemption-mode hidden)."""
    assert manager.allocate("r", CacheKind.KV, num_tokens)
    src, dst = manager.demote("r", num_tokens)
    return SchedulerOutput(0, conversions=[CacheConversion("r", num_tokens, CacheKind.KV, src, CacheKind.HIDDEN,
                                                           dst)])


def recompute_step(manager: CacheManager, num_tokens: int) -> SchedulerOutput:
    """The same request's `num_tokens` prefilled from scratch into KV, its next token sampled."""
    assert manager.allocate("r", CacheKind.KV, num_tokens)
    return SchedulerOutput(0, [ScheduledRequest("r", [100 + i % 1000 for i in range(num_tokens)], 0, CacheKind.KV,
                                                manager.unit_ids("r"), True, GREEDY)])


def pool(config, token_counts: list[int]):
    """(units, a fresh CacheManager maker) for the longest request as hidden rows and as KV at once."""
    units_per_hidden = hidden_units_per_block(config.hidden_size, config.kv_dim)
    num_units = (2 + units_per_hidden) * -(-max(token_counts) // BLOCK_SIZE)
    return num_units, lambda: CacheManager(num_units, BLOCK_SIZE, units_per_hidden)


def median_s(runner: ModelRunner, make_step, repeats: int) -> float:
    runner.execute(make_step())  # warm-up
    samples = []
    for _ in range(repeats):
        step = make_step()
        start = time.perf_counter()
        runner.execute(step)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def cpu_points(model: str, token_counts: list[int], repeats: int) -> list[dict]:
    config = load_model_config(resolve_model(model))
    num_units, fresh = pool(config, token_counts)
    # The least scratch (one context); the left inverses, as an engine with --preemption-mode hidden keeps them.
    runner = ModelRunner(config, num_units, BLOCK_SIZE, "float32", "cpu", demote_in_place=True)
    points = []
    for num_tokens in token_counts:
        restore = median_s(runner, lambda: restore_step(fresh(), num_tokens), repeats)
        demote = median_s(runner, lambda: demote_step(fresh(), num_tokens), repeats)
        recompute = median_s(runner, lambda: recompute_step(fresh(), num_tokens), repeats)
        points.append({"model": model, "tokens": num_tokens, "restore_s": restore, "demote_s": demote,
                       "recompute_s": recompute, "restore_ms_per_token": 1e3 * restore / num_tokens,
                       "demote_ms_per_token": 1e3 * demote / num_tokens,
                       "recompute_ms_per_token": 1e3 * recompute / num_tokens,
                       "recompute_over_restore": recompute / restore,
                       "hidden_over_kv_bytes": hidden_units_per_block(config.hidden_size, config.kv_dim) / 2,
                       "load_average": load_average()})
        print(f"{model} {num_tokens:5d} tokens: restore {restore * 1e3:8.1f} ms, demote {demote * 1e3:8.1f} ms, "
              f"recompute {recompute * 1e3:8.1f} ms ({recompute / restore:.1f}x a restore)", flush=True)
    return points


def gpu_points(token_counts: list[int], pcie_bytes_per_s: float) -> list[dict]:
    points = []
    for model, gpu, tensor_parallel in GPU_SETUPS:
        config = sim_model_config(model, None)
        roofline = RooflineCostModel(config, gpu_spec(gpu), tensor_parallel)
        _, fresh = pool(config, token_counts)
        value_bytes = roofline.bytes_per_value * config.num_layers
        for num_tokens in token_counts:
            restore_out, recompute_out = restore_step(fresh(), num_tokens), recompute_step(fresh(), num_tokens)
            restore = roofline.step_time(restore_out) - roofline.step_overhead_s
            recompute = roofline.step_time(recompute_out) - roofline.step_overhead_s
            batch_s = roofline.step_time(SchedulerOutput(0, list(BATCH)))
            restore_beside = roofline.step_time(SchedulerOutput(0, list(BATCH), conversions=restore_out.conversions))
            recompute_beside = roofline.step_time(SchedulerOutput(0, [*BATCH, *recompute_out.scheduled]))
            hidden_copy = num_tokens * config.hidden_size * value_bytes / pcie_bytes_per_s
            # Each GPU copies its own KV heads over its own link; hidden rows are needed whole on every GPU.
            kv_copy = num_tokens * 2 * config.kv_dim * value_bytes / tensor_parallel / pcie_bytes_per_s
            points.append({"model": model, "gpu": f"{tensor_parallel}x {gpu}", "tokens": num_tokens,
                           "restore_s": restore, "recompute_s": recompute,
                           "restore_beside_batch_s": restore_beside - batch_s,
                           "recompute_beside_batch_s": recompute_beside - batch_s,
                           "restore_from_host_s": restore + hidden_copy,
                           "restore_from_host_overlapped_s": max(restore, hidden_copy), "kv_swap_in_s": kv_copy,
                           "recompute_over_restore": recompute / restore})
            print(f"{model} on {tensor_parallel}x {gpu}, {num_tokens:5d} tokens: restore {restore * 1e3:7.2f} ms, "
                  f"recompute {recompute * 1e3:7.2f} ms, from host: hidden {1e3 * (restore + hidden_copy):7.2f} ms "
                  f"({1e3 * max(restore, hidden_copy):7.2f} ms overlapped), "
                  f"KV swap {1e3 * kv_copy:7.2f} ms; beside the batch: restore "
                  f"{1e3 * (restore_beside - batch_s):7.2f} ms, recompute {1e3 * (recompute_beside - batch_s):7.2f} ms",
                  flush=True)
    return points


def plot(path: Path, cpu: list[dict], gpu: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"{p['model']}\n{p['tokens']} tok" for p in cpu]
    x = range(len(cpu))
    left.bar([i - 0.27 for i in x], [p["restore_ms_per_token"] for p in cpu], 0.27,
             label="restore (project hidden rows)")
    left.bar(list(x), [p["demote_ms_per_token"] for p in cpu], 0.27, label="demote (solve K/V back to hidden rows)")
    left.bar([i + 0.27 for i in x], [p["recompute_ms_per_token"] for p in cpu], 0.27, label="recompute (prefill)")
    left.set_xticks(list(x), labels, fontsize=8)
    left.set_ylabel("ms per token")
    left.set_title("this CPU, fp32 (measured)")
    left.legend(fontsize=8)
    labels = [f"{p['model']}\n{p['gpu']}\n{p['tokens']} tok" for p in gpu]
    x = range(len(gpu))
    width = 0.16
    for offset, key, label in ((-2, "restore_s", "restore (hidden rows on GPU)"),
                               (-1, "restore_from_host_s", "restore (hidden rows from host, then projected)"),
                               (0, "restore_from_host_overlapped_s", "restore from host, overlapped"),
                               (1, "kv_swap_in_s", "KV swap-in from host"), (2, "recompute_s", "recompute")):
        right.bar([i + offset * width for i in x], [1e3 * p[key] / p["tokens"] for p in gpu], width, label=label)
    right.set_xticks(list(x), labels, fontsize=7)
    right.set_ylabel("ms per token")
    right.set_yscale("log")
    right.set_title("roofline model, fp16")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    token_counts = [int(t) for t in args.tokens.split(",")]
    cpu = [p for model in args.models.split(",") for p in cpu_points(model, token_counts, args.repeats)]
    gpu = gpu_points(token_counts, args.pcie_gb_s * 1e9)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = write_json(args.out_dir / "hidden_restore.json", {
        "benchmark": "hidden_restore", "command": sys.argv, "pcie_gb_s": args.pcie_gb_s, "cpu": cpu, "gpu": gpu})
    plot(args.out_dir / "hidden_restore.png", cpu, gpu)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
