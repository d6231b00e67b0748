"""A/B of the engine's CPU speed work, in one process: each change switched off on its own, the rest as shipped.

- packed: oneDNN-packed (and fused, with the activations and residual adds inside the GEMMs) linears, vs the same
  fused linears on plain F.linear (what machines without oneDNN packing run);
- paged kernel: decode attention reading K/V in place (our C++ kernel) vs gathering K/V and calling SDPA;
- rms_norm kernel: Llama's RMSNorm in one pass (our C++ kernel) vs torch's F.rms_norm;
- prefill kernel: prefill attention on AVX-512 (our C++ kernel; bf16 with vdpbf16ps) vs torch's SDPA.

Each configuration builds its own engine on the default model and is timed with step_speed's figures (decode step
at --decode-rows rows of --decode-contexts-token contexts, prefill of one prompt of each --prefill-lens), min of
--repeats; the decode step is the median of the steps timed one by one, as step_speed.py times it.

    .venv/bin/python benchmarks/engine_ab.py        # ~6 min
    .venv/bin/python benchmarks/engine_ab.py --configs "as shipped,plain linears" --prefill-lens 256,1024,2048
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks._step_speed_common import measure  # noqa: E402
from benchmarks.common import RESULTS_DIR, bar_chart, write_json  # noqa: E402
from benchmarks.step_speed import aptserve_stepping_run, figures_args  # noqa: E402

CONFIGS = {"as shipped": (), "plain linears": ("packed",), "gather attention": ("kernel",),
           "neither": ("packed", "kernel"), "torch rms_norm": ("rms_norm",),
           "torch prefill attention": ("prefill_kernel",)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--decode-rows", default="1,8,32")
    parser.add_argument("--decode-contexts", default="256")
    parser.add_argument("--prefill-lens", default="512")
    parser.add_argument("--dtype", default="float32", help="the engine's --dtype (auto: this CPU's default)")
    parser.add_argument("--kv-cache-memory", type=int, default=512 << 20)
    parser.add_argument("--name", default="engine_ab", help="file name of the results")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


@contextlib.contextmanager
def switched_off(features: tuple[str, ...]):
    from aptserve.model import attention, linear, rms_norm
    from aptserve.runner import model_runner

    saved = linear.can_pack, model_runner.cpu_kernels, rms_norm.cpu_kernels, attention.prefill_kernel_dtypes
    if "packed" in features:
        linear.can_pack = lambda weight: False
    if "kernel" in features:
        model_runner.cpu_kernels = lambda: None
    if "rms_norm" in features:
        rms_norm.cpu_kernels = lambda: None
    if "prefill_kernel" in features:
        attention.prefill_kernel_dtypes = frozenset
    try:
        yield
    finally:
        linear.can_pack, model_runner.cpu_kernels, rms_norm.cpu_kernels, attention.prefill_kernel_dtypes = saved


def run(args, features: tuple[str, ...]) -> dict:
    from aptserve import LLM

    with switched_off(features):  # the whole run: the prefill kernel is looked up at each call
        llm = LLM(model=args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, max_num_seqs=64,
                  max_model_len=4096)
        return {**measure(aptserve_stepping_run(llm), *figures_args(args)), "dtype": llm.engine.config.dtype}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = {name: CONFIGS[name] for name in args.configs.split(",")}
    results = {}
    for name, features in configs.items():
        results[name] = run(args, features)
        print(f"{name}: {results[name]}", flush=True)
    write_json(Path(args.out_dir) / f"{args.name}.json", {"benchmark": "engine_ab", "config": vars(args),
                                                       "switched_off": configs, "results": results})
    labels, values = [], []
    for name, result in results.items():
        for rows, figure in result["decode"].items():
            labels.append(f"{name}\ndecode x{rows}")
            values.append(figure["step_ms"])
        for length, figure in result["prefill"].items():
            labels.append(f"{name}\nprefill {length}")
            values.append(figure["ms"])
    bar_chart(Path(args.out_dir) / f"{args.name}.png", labels, values, title="engine A/B, one process (ms, lower is "
              "better)", ylabel="ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
