"""The paged decode attention kernel alone, against the memory it reads: time per 30-layer step and GB/s over
synthetic caches laid out as the engine's (SmolLM2's heads: 9 query, 3 KV, head_dim 64; 16-row blocks; K and V
units in a shuffled order, as a long-running pool leaves them), for several rows x context sizes.

With --baseline REV, the same figures for the kernel source at that git revision, built beside this one and timed
in the same process, round by round (an A/B in one run; medians of --rounds).

    .venv/bin/python benchmarks/decode_attention.py                       # ~1 min
    .venv/bin/python benchmarks/decode_attention.py --baseline HEAD~1     # A/B against a previous kernel
    .venv/bin/python benchmarks/decode_attention.py --baseline HEAD~1 --engine-shapes 8x600,8x2000   # + in the engine

--engine-shapes also times each kernel inside the engine (default model, fcfs, one prefill step, then 32 decode
steps of those rows x context): the kernel's calls and the whole step, medians over the pure-decode steps.

Writes <out-dir>/<name>.json and .png.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks.common import REPO_ROOT, RESULTS_DIR, bar_chart, write_json  # noqa: E402

CSRC = "aptserve/model/csrc"
LAYERS, BLOCK_SIZE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 30, 16, 9, 3, 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1x600,8x600,8x2000,32x600,32x2000", help="rows x context, comma-separated")
    parser.add_argument("--baseline", default=None, help="a git revision whose kernel source to time beside this one")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engine-shapes", default="", help="rows x context to time inside the engine as well")
    parser.add_argument("--name", default="decode_attention")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def build_at(revision: str, folder: Path):
    """The kernel module built from `revision`'s sources (its own module name, so both load in one process)."""
    from torch.utils.cpp_extension import load

    from aptserve.model.cpu_kernels import CFLAGS

    listing = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-tree", "--name-only", f"{revision}:{CSRC}"],
                             capture_output=True, text=True, check=True).stdout.split()
    for name in listing:
        source = subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"{revision}:{CSRC}/{name}"],
                                capture_output=True, text=True, check=True).stdout
        (folder / name).write_text(source)
    sources = [str(folder / name) for name in listing if name.endswith(".cpp")]
    return load(name="aptserve_cpu_kernels_baseline", sources=sources, extra_cflags=[*CFLAGS, "-march=native"],
                extra_include_paths=[str(folder)], build_directory=str(folder), verbose=False)


def time_shape(kernels: dict, rows: int, context: int, rounds: int) -> dict:
    import torch

    num_blocks = (context + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_units = rows * num_blocks * 2
    caches = [torch.randn(num_units, BLOCK_SIZE, NUM_KV_HEADS * HEAD_DIM) for _ in range(LAYERS)]
    order = torch.randperm(num_units).view(rows, num_blocks, 2)
    k_units, v_units = order[..., 0].contiguous(), order[..., 1].contiguous()
    context_lens = torch.full((rows,), context, dtype=torch.long)
    query = torch.randn(rows, NUM_HEADS, HEAD_DIM)
    out = torch.empty_like(query)
    times = {name: [] for name in kernels}
    for _ in range(rounds):
        for name, module in kernels.items():
            start = time.perf_counter()
            for cache in caches:
                module.paged_decode_attention(out, query, cache, k_units, v_units, context_lens, HEAD_DIM**-0.5,
                                              NUM_KV_HEADS)
            times[name].append(time.perf_counter() - start)
    gigabytes = LAYERS * rows * context * 2 * NUM_KV_HEADS * HEAD_DIM * 4 / 1e9
    return {name: {"step_ms": 1e3 * statistics.median(t), "GB_per_s": gigabytes / statistics.median(t)}
            for name, t in times.items()}


class _TimedKernels:
    """A kernel module whose decode attention adds its time to `seconds`."""

    def __init__(self, module) -> None:
        self.module, self.seconds = module, 0.0

    def paged_decode_attention(self, *args) -> None:
        start = time.perf_counter()
        self.module.paged_decode_attention(*args)
        self.seconds += time.perf_counter() - start


def time_in_engine(kernels: dict, shapes: list[str], rounds: int) -> dict:
    """Medians over the pure-decode steps of each shape: the step and the kernel's calls in it, per kernel."""
    from aptserve import LLM, SamplingParams
    from aptserve.model import attention
    from benchmarks._step_speed_common import prompts_for

    llm = LLM(model="default", dtype="float32", kv_cache_memory=1 << 30, max_num_seqs=64, max_model_len=4096,
              scheduler="fcfs", max_num_batched_tokens=16384)
    executor, steps = llm.engine.core.executor, []
    execute = executor.execute
    timed = {name: _TimedKernels(module) for name, module in kernels.items()}

    def timed_execute(sched_out):
        before = {name: t.seconds for name, t in timed.items()}
        start = time.perf_counter()
        out = execute(sched_out)
        kernel_s = sum(t.seconds - before[name] for name, t in timed.items())
        steps.append((sched_out.total_num_scheduled_tokens, len(sched_out.scheduled), time.perf_counter() - start,
                      kernel_s))
        return out

    executor.execute = timed_execute
    salt = iter(range(1, 1_000_000))
    samples = {shape: {name: ([], []) for name in kernels} for shape in shapes}
    loaded_kernels = attention.cpu_kernels
    try:
        for _ in range(rounds):
            for name, kernel in timed.items():
                attention.cpu_kernels = lambda kernel=kernel: kernel
                for shape in shapes:
                    rows, context = (int(part) for part in shape.split("x"))
                    steps.clear()
                    llm.generate(prompts_for(rows, context, next(salt)),
                                 SamplingParams(temperature=0, max_tokens=33, ignore_eos=True), use_tqdm=False)
                    step_ms, kernel_ms = samples[shape][name]
                    for tokens, requests, step_s, kernel_s in steps:
                        if tokens == requests == rows:
                            step_ms.append(1e3 * step_s)
                            kernel_ms.append(1e3 * kernel_s)
    finally:
        attention.cpu_kernels, executor.execute = loaded_kernels, execute
    return {shape: {name: {"step_ms": statistics.median(step), "kernel_ms": statistics.median(kernel)}
                    for name, (step, kernel) in by_kernel.items()} for shape, by_kernel in samples.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aptserve.model.cpu_kernels import cpu_kernels

    kernels = {}
    with tempfile.TemporaryDirectory() as folder:
        if args.baseline:
            kernels[f"at {args.baseline}"] = build_at(args.baseline, Path(folder))
        kernels["this tree"] = cpu_kernels()
        if kernels["this tree"] is None:
            print("error: the CPU kernels are not built here", file=sys.stderr)
            return 2
        results = {}
        for shape in args.shapes.split(","):
            rows, context = (int(part) for part in shape.split("x"))
            results[shape] = time_shape(kernels, rows, context, args.rounds)
            print(shape, {k: f"{v['step_ms']:.1f} ms, {v['GB_per_s']:.1f} GB/s" for k, v in results[shape].items()},
                  flush=True)
        in_engine = time_in_engine(kernels, args.engine_shapes.split(","), args.rounds) if args.engine_shapes else {}
        for shape, by_kernel in in_engine.items():
            print("engine", shape, {k: f"step {v['step_ms']:.1f} ms, kernel {v['kernel_ms']:.1f} ms"
                                    for k, v in by_kernel.items()}, flush=True)
    write_json(Path(args.out_dir) / f"{args.name}.json", {"benchmark": "decode_attention", "config": vars(args),
                                                          "results": results, "in_engine": in_engine})
    labels = [f"{shape}\n{name}" for shape, by_kernel in results.items() for name in by_kernel]
    values = [figure["GB_per_s"] for by_kernel in results.values() for figure in by_kernel.values()]
    bar_chart(Path(args.out_dir) / f"{args.name}.png", labels, values, ylabel="GB/s of K/V read",
              title="paged decode attention, 30 layers (rows x context)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
