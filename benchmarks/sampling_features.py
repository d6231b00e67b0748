"""What each sampling feature of the OpenAI surface costs at batch 32: engine steps with it on vs off.

32 requests of distinct 128-token prompts, 64 output tokens each (every request runs to the end: `ignore_eos`, or a
grammar that cannot finish in 64 tokens), offline on the default model, fp32. For each variant: the mean step time
(wall time of the whole batch / engine steps) and output tokens/s, best of `--repeats`, in one run. Also the
grammar backends' per-step mask time at batch 32 (llguidance, the one aptserve uses; xgrammar if importable), and
the A/B of top-k / top-p from the most likely candidates vs sorting whole rows.

    .venv/bin/python benchmarks/sampling_features.py            # ~3 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, bar_chart, load_average, write_json  # noqa: E402

# An array of at least 40 short strings: no answer ends within 64 tokens, so the batch stays at 32.
LONG_JSON = json.dumps({"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 40})


def variants():
    from aptserve.sampling import SamplingParams
    from aptserve.structured_output import StructuredOutput

    base = dict(max_tokens=64, ignore_eos=True, temperature=0.0)
    return {
        "greedy": [SamplingParams(**base)] * 32,
        "random (T 0.8, top-p 0.9, top-k 50)": [SamplingParams(**{**base, "temperature": 0.8}, top_p=0.9, top_k=50,
                                                              seed=i) for i in range(32)],
        "logprobs 5": [SamplingParams(**base, logprobs=5)] * 32,
        "penalties (presence, frequency, repetition)": [SamplingParams(**base, presence_penalty=0.5,
                                                                       frequency_penalty=0.5,
                                                                       repetition_penalty=1.1)] * 32,
        "min_p 0.05 (T 1)": [SamplingParams(**{**base, "temperature": 1.0}, min_p=0.05, seed=i) for i in range(32)],
        "logit_bias (10 tokens)": [SamplingParams(**base, logit_bias={100 + t: 1.5 for t in range(10)})] * 32,
        "echo (prompt logprobs 1)": [SamplingParams(**base, prompt_logprobs=1)] * 32,
        "structured JSON schema": [SamplingParams(max_tokens=64, temperature=0.0,
                                                  structured=StructuredOutput("json", LONG_JSON))] * 32,
    }


def run_variants(repeats: int) -> dict:
    from aptserve import LLM

    llm = LLM(model="default", dtype="float32", kv_cache_memory=1 << 30, max_num_seqs=32)
    prompts = [[(7919 * 3 + 104729 * i + 31 * j) % 40000 + 100 for j in range(128)] for i in range(32)]
    results = {}
    llm.generate(prompts[:2], variants()["greedy"][:2], use_tqdm=False)  # warm-up
    from aptserve.runner import logits_processing

    cases = list(variants().items())
    cases.insert(2, ("random, whole-row sort (A/B)", cases[1][1]))
    candidates = logits_processing.TOP_CANDIDATES
    for salt, (name, params) in enumerate(cases):
        # The A/B: top-k / top-p by sorting every row (no candidates), as before TOP_CANDIDATES.
        logits_processing.TOP_CANDIDATES = 0 if "A/B" in name else candidates
        best = None
        for repeat in range(repeats):
            batch = [[(t + 1000 * (salt * repeats + repeat + 1)) % 40000 + 100 for t in p] for p in prompts]
            steps_before = llm.engine.core.num_steps
            start = time.perf_counter()
            outputs = llm.generate(batch, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            steps = llm.engine.core.num_steps - steps_before
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            if best is None or seconds < best["seconds"]:
                best = {"seconds": seconds, "steps": steps, "step_ms": 1e3 * seconds / steps,
                        "output_tokens": tokens, "tokens_per_s": tokens / seconds}
        results[name] = best
        print(f"{name}: {json.dumps(best)}", flush=True)
    return results


def mask_times(batch: int = 32, steps: int = 48) -> dict:
    """Per-step time to compute and apply the token masks of `batch` JSON-schema requests, per backend."""
    import torch

    from aptserve.registry import load_tokenizer, resolve_model

    tokenizer, vocab = load_tokenizer(resolve_model("default")), 49152
    schema = json.dumps({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "age", "tags"]})
    out = {}

    def time_it(make, fill, accept):
        matchers = [make() for _ in range(batch)]
        from aptserve.runner.grammar import BITS

        bitmask = torch.empty(batch, -(-vocab // BITS), dtype=torch.int32)
        generator, fill_s, apply_s = torch.Generator().manual_seed(0), 0.0, 0.0
        for _ in range(steps):
            logits = torch.randn(batch, vocab, generator=generator)
            start = time.perf_counter()
            fill(matchers, bitmask)
            fill_s += time.perf_counter() - start
            start = time.perf_counter()
            allowed = ((bitmask[:, :, None] >> torch.arange(BITS, dtype=torch.int32)) & 1).view(batch, -1)[:, :vocab]
            logits.masked_fill_(allowed == 0, float("-inf"))
            apply_s += time.perf_counter() - start
            for matcher, token in zip(matchers, logits.argmax(-1).tolist()):
                accept(matcher, token)
        return {"fill_ms_per_step": 1e3 * fill_s / steps, "apply_ms_per_step": 1e3 * apply_s / steps}

    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltokenizer, executor = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab), llguidance.LLExecutor()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    out["llguidance"] = time_it(
        lambda: llguidance.LLMatcher(lltokenizer, grammar),
        lambda ms, bm: llguidance.torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(ms)], bm),
        lambda m, t: m.is_stopped() or m.consume_token(t))
    try:
        import xgrammar
    except ImportError as exc:
        out["xgrammar"] = {"error": f"not installed ({exc}); pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi"}
    else:
        compiled = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
                                            ).compile_json_schema(schema)

        def fill(ms, bm):
            for i, m in enumerate(ms):
                if not m.is_terminated():
                    m.fill_next_token_bitmask(bm, i)
        out["xgrammar"] = time_it(lambda: xgrammar.GrammarMatcher(compiled), fill,
                                  lambda m, t: m.is_terminated() or m.accept_token(t))
    for name, figures in out.items():
        print(f"mask {name}: {json.dumps(figures)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    load_before = load_average()
    masks = mask_times()
    results = run_variants(args.repeats)
    baseline = results["greedy"]["step_ms"]
    for figures in results.values():
        figures["step_cost_vs_greedy"] = figures["step_ms"] / baseline
    out_dir = Path(args.out_dir)
    write_json(out_dir / "sampling_features.json", {
        "benchmark": "sampling_features", "config": vars(args), "load_average_before": load_before,
        "batch": 32, "prompt_len": 128, "output_len": 64, "variants": results, "grammar_masks": masks,
        "load_average_after": load_average()})
    bar_chart(out_dir / "sampling_features.png", list(results), [r["step_ms"] for r in results.values()],
              title="aptserve step time at batch 32 by sampling feature (default model, fp32, 2 cores)",
              ylabel="ms per engine step", annotations=[f"{r['step_cost_vs_greedy']:.2f}x" for r in results.values()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
