"""How close bf16 serving stays to float32: aptserve in bf16 (and float32 weights with a bf16 KV cache) against HF
transformers in bf16 and against our own float32, on held-back ShareGPT prompts of the default model.

Every system is scored on the same token sequences: each prompt followed by HF's float32 greedy continuation
(teacher forcing), so one early divergence does not decide the rest. Per system pair:
- top-1 agreement: the share of continuation positions where both systems' most likely token is the same;
- max |logprob| difference: the largest gap between their log probabilities of the reference token;
- free-running greedy agreement: the share of prompts whose whole greedy continuation is identical, and the mean
  share of it generated before the first differing token.

    .venv/bin/python benchmarks/dtype_accuracy.py          # ~6 min on 2 AVX2 cores (bf16 is emulated there)

Writes <out-dir>/<name>.json (default dtype_accuracy.json).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks.common import RESULTS_DIR, write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=20261203, help="of the ShareGPT sample (not the tests' prompts)")
    parser.add_argument("--name", default="dtype_accuracy", help="file name of the results")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def held_back_prompts(tokenizer, num_prompts: int, seed: int) -> list[list[int]]:
    from aptserve.bench.traces import load_trace

    trace = load_trace("sharegpt", tokenizer, num_prompts, seed=seed, max_prompt_len=200)
    return [tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for r in trace]


class HFSystem:
    def __init__(self, path: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        outputs = []
        with self.torch.inference_mode():
            for prompt in prompts:
                ids = self.torch.tensor([prompt])
                out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=0)
                outputs.append(out[0, len(prompt):].tolist())
        return outputs

    def scored(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[tuple[float, bool]]]:
        """(log probability of each continuation token, whether it is the most likely one)."""
        rows = []
        with self.torch.inference_mode():
            for prompt, continuation in zip(prompts, continuations):
                logits = self.model(self.torch.tensor([prompt + continuation])).logits[0].float()
                logprobs = self.torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
                rows.append([(logprobs[i, t].item(), logprobs[i].argmax().item() == t)
                             for i, t in enumerate(continuation)])
        return rows


class AptSystem:
    def __init__(self, dtype: str, kv_cache_dtype: str = "auto", **engine) -> None:
        from aptserve import LLM, SamplingParams

        self.params = SamplingParams
        self.llm = LLM(model="default", dtype=dtype, kv_cache_dtype=kv_cache_dtype, kv_cache_memory=256 << 20,
                       **engine)

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = self.params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        return [o.outputs[0].token_ids for o in self.llm.generate(prompts, params, use_tqdm=False)]

    def scored(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[tuple[float, bool]]]:
        outputs = self.llm.generate([p + c for p, c in zip(prompts, continuations)], self.scoring_params(),
                                    use_tqdm=False)
        return continuation_scores(prompts, continuations, outputs)

    def scoring_params(self):
        return self.params(temperature=0, max_tokens=1, prompt_logprobs=0)


def continuation_scores(prompts: list[list[int]], continuations: list[list[int]],
                        outputs: list) -> list[list[tuple[float, bool]]]:
    """(log probability of each continuation token, whether it is the most likely one), from the prompt logprobs of
    each prompt + continuation: prompt_logprobs[i] is prompt token i + 1's; rank 1 = the most likely token."""
    return [[(o.prompt_logprobs[len(p) - 1 + i].logprob, o.prompt_logprobs[len(p) - 1 + i].rank == 1)
             for i in range(len(c))] for p, c, o in zip(prompts, continuations, outputs)]


def compare(a: dict, b: dict) -> dict:
    """Teacher-forced and free-running agreement of two systems' results."""
    pairs = [(x, y) for row_a, row_b in zip(a["scored"], b["scored"]) for x, y in zip(row_a, row_b)]
    prefixes = []
    for x, y in zip(a["greedy"], b["greedy"]):
        same = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x))
        prefixes.append(same / len(x))
    return {"top1_agreement": sum(x[1] == y[1] for x, y in pairs) / len(pairs),
            "max_abs_logprob_diff": max(abs(x[0] - y[0]) for x, y in pairs),
            "mean_abs_logprob_diff": sum(abs(x[0] - y[0]) for x, y in pairs) / len(pairs),
            "identical_greedy_continuations": sum(p == 1 for p in prefixes) / len(prefixes),
            "mean_share_before_first_difference": sum(prefixes) / len(prefixes)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aptserve.registry import load_tokenizer, resolve_model

    path = resolve_model("default")
    prompts = held_back_prompts(load_tokenizer(path), args.num_prompts, args.seed)
    start_s = time.perf_counter()
    systems = {"hf-fp32": lambda: HFSystem(path, "float32"), "hf-bf16": lambda: HFSystem(path, "bfloat16"),
               "aptserve-fp32": lambda: AptSystem("float32"), "aptserve-bf16": lambda: AptSystem("bfloat16"),
               "aptserve-fp32-kv-bf16": lambda: AptSystem("float32", "bfloat16")}
    results, reference = {}, None
    for name, build in systems.items():
        system = build()
        greedy = system.greedy(prompts, args.max_tokens)
        reference = reference or greedy  # HF float32's continuations, scored by every system
        results[name] = {"greedy": greedy, "scored": system.scored(prompts, reference)}
        del system
    pairs = [("aptserve-fp32", "hf-fp32"), ("aptserve-bf16", "hf-bf16"), ("aptserve-bf16", "aptserve-fp32"),
             ("hf-bf16", "hf-fp32"), ("aptserve-fp32-kv-bf16", "aptserve-fp32")]
    comparisons = {f"{a} vs {b}": compare(results[a], results[b]) for a, b in pairs}
    for name, figures in comparisons.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()), flush=True)
    write_json(Path(args.out_dir) / f"{args.name}.json", {
        "benchmark": "dtype_accuracy", "config": vars(args), "num_prompts": len(prompts),
        "seconds": round(time.perf_counter() - start_s, 1), "comparisons": comparisons})
    return 0


if __name__ == "__main__":
    sys.exit(main())
