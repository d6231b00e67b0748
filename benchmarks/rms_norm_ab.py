"""A/B of the RMSNorm kernel on one engine: the same loaded model, its norms switched between our one-pass kernel and
torch's F.rms_norm round by round (interleaved, so the machine's drift falls on both), timed as step_speed does
(decode step at --decode-rows rows of --decode-context-token contexts, step_speed's formula; prefill of
one fresh prompt of each --prefill-lens), medians over --rounds.

    .venv/bin/python benchmarks/rms_norm_ab.py      # ~10 min
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks._step_speed_common import DECODE_TOKENS, decode_step_seconds, prompts_for  # noqa: E402
from benchmarks.common import RESULTS_DIR, bar_chart, write_json  # noqa: E402

VARIANTS = ("kernel", "torch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--decode-rows", default="1,8,32")
    parser.add_argument("--decode-context", type=int, default=600)
    parser.add_argument("--prefill-lens", default="256,1024,2048")
    parser.add_argument("--name", default="rms_norm_ab", help="file name of the results")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aptserve import LLM, SamplingParams
    from aptserve.model.rms_norm import RMSNorm

    llm = LLM(model=args.model, kv_cache_memory=512 << 20, max_num_seqs=64, max_model_len=4096,
              enable_prefix_caching=False)
    norms = [m for m in llm.engine.core.executor.model.modules() if isinstance(m, RMSNorm)]
    kernels = norms[0].kernels
    if kernels is None:
        raise SystemExit("the RMSNorm kernel is not in use here (not built, or not a float32 Llama model)")
    salt = iter(range(1, 1_000_000))

    def generate(prompts, max_tokens: int) -> float:
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    generate(prompts_for(2, 16, next(salt)), 4)  # warm-up
    rows_list = [int(x) for x in args.decode_rows.split(",")]
    lens = [int(x) for x in args.prefill_lens.split(",")]
    samples: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
    for round_index in range(args.rounds):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            for norm in norms:
                norm.kernels = kernels if variant == "kernel" else None
            for rows in rows_list:
                one = generate(prompts_for(rows, args.decode_context, next(salt)), 1)
                many = generate(prompts_for(rows, args.decode_context, next(salt)), DECODE_TOKENS)
                samples[variant].setdefault(f"decode x{rows}", []).append(1e3 * decode_step_seconds(one, many))
            for length in lens:
                samples[variant].setdefault(f"prefill {length}", []).append(
                    1e3 * generate(prompts_for(1, length, next(salt)), 1))
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{k} {samples['kernel'][k][-1]:.1f} / {samples['torch'][k][-1]:.1f} ms" for k in samples["kernel"]),
            flush=True)
    medians = {v: {k: statistics.median(x) for k, x in samples[v].items()} for v in VARIANTS}
    speedup = {k: medians["torch"][k] / medians["kernel"][k] for k in medians["kernel"]}
    write_json(Path(args.out_dir) / f"{args.name}.json", {
        "benchmark": "rms_norm_ab", "config": vars(args), "unit": "ms (decode: per step; prefill: whole prompt)",
        "medians_ms": medians, "samples_ms": samples, "torch_over_kernel": speedup})
    labels = [f"{k}\n{v}" for k in medians["kernel"] for v in VARIANTS]
    values = [medians[v][k] for k in medians["kernel"] for v in VARIANTS]
    notes = [f"{speedup[k]:.2f}x" if v == "kernel" else "" for k in medians["kernel"] for v in VARIANTS]
    bar_chart(Path(args.out_dir) / f"{args.name}.png", labels, values, annotations=notes,
              title="RMSNorm: our kernel vs torch's, one engine, interleaved (ms, lower is better)", ylabel="ms")
    for key, ratio in speedup.items():
        print(f"{key}: kernel {medians['kernel'][key]:.1f} ms, torch {medians['torch'][key]:.1f} ms ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
