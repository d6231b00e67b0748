"""Would 8-bit hidden rows keep the model's answers? The accuracy half of quantised hidden rows, measured before
anything is built: every request runs as hidden rows (`--hybrid-cache all-hidden`, so every past token's K/V is
re-projected from its stored row in every step), the rows quantised to int8 with one absmax scale per row as they are
written and dequantised at once (storage unchanged: this measures what an 8-bit row would give, not its memory), with
one absmax scale per row or per group of `--group-size` values of a row (as XQuant and KIVI group theirs).

Scored on held-back ShareGPT prompts of the default model (SmolLM2, GQA: the case 8-bit rows are meant for) against
the KV cache and against float32 hidden rows, all in float32, each on the same token sequences (the prompt followed by
the KV cache's greedy continuation, teacher-forced through chunked prefill of `--chunk` tokens so that each chunk
reads the rows of those before it) and free-running greedy. Figures as in dtype_accuracy.py.

    .venv/bin/python benchmarks/hidden_int8_accuracy.py     # ~8 min on 2 AVX2 cores

Writes <out-dir>/hidden_int8_accuracy.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks.common import RESULTS_DIR, write_json  # noqa: E402
from benchmarks.dtype_accuracy import AptSystem, compare, continuation_scores, held_back_prompts  # noqa: E402

INT8_MAX = 127


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16, help="prefill tokens per step while scoring")
    parser.add_argument("--group-size", type=int, default=64, help="values per scale in the grouped variant")
    parser.add_argument("--seed", type=int, default=20261203, help="of the ShareGPT sample (not the tests' prompts)")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def int8_round_trip(x, group_size: int | None = None):
    """x [N, hidden] quantised to int8 with an absmax scale per row (or per `group_size` values of a row), and back."""
    groups = x.reshape(x.shape[0], -1, group_size or x.shape[1])
    scale = groups.abs().amax(dim=2, keepdim=True).clamp_min(1e-12) / INT8_MAX
    return ((groups / scale).round().clamp(-INT8_MAX, INT8_MAX) * scale).reshape(x.shape)


@contextmanager
def int8_hidden_rows(group_size: int | None):
    """Every hidden row written by the attention layers goes through int8_round_trip first."""
    from aptserve.model import attention

    write = attention.write_hidden_rows
    attention.write_hidden_rows = lambda cache, x, slots: write(cache, int8_round_trip(x, group_size), slots)
    try:
        yield
    finally:
        attention.write_hidden_rows = write


class HiddenRowsSystem(AptSystem):
    """Greedy on apt-chunked; scoring one prompt at a time through `chunk`-token prefill steps, so that each chunk
    reads the rows of those before it."""

    def __init__(self, hybrid_cache: str, chunk: int) -> None:
        super().__init__("float32", hybrid_cache=hybrid_cache, scheduler="apt-chunked")
        self.chunked = AptSystem("float32", hybrid_cache=hybrid_cache, scheduler="chunked",
                                 max_num_batched_tokens=chunk).llm

    def scored(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[tuple[float, bool]]]:
        outputs = [self.chunked.generate([p + c], self.scoring_params(), use_tqdm=False)[0]
                   for p, c in zip(prompts, continuations)]
        return continuation_scores(prompts, continuations, outputs)


def int8_error(prompts: list[list[int]], group_size: int) -> dict:
    """The round trip's relative error on real rows: each layer's attention input of the first prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    from aptserve.registry import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("default"), dtype=torch.float32).eval()
    rows = []
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, args, out: rows.append(args[0][0]))
             for layer in model.model.layers]
    with torch.inference_mode():
        for prompt in prompts[:4]:
            model(torch.tensor([prompt]))
    for hook in hooks:
        hook.remove()
    x = torch.cat(rows)
    errors = {"rows": x.shape[0]}
    for name, group in (("per_row", None), (f"per_{group_size}", group_size)):
        err = (int8_round_trip(x, group) - x).norm(dim=1) / x.norm(dim=1)
        errors[name] = {"mean_relative_l2": err.mean().item(), "max_relative_l2": err.max().item()}
    return errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aptserve.registry import load_tokenizer, resolve_model

    prompts = held_back_prompts(load_tokenizer(resolve_model("default")), args.num_prompts, args.seed)
    start_s = time.perf_counter()
    results, reference = {}, None
    quantised = {"hidden-int8-row": None, f"hidden-int8-g{args.group_size}": args.group_size}  # name: group size
    for name, hybrid in (("kv", "off"), ("hidden-fp32", "all-hidden"), *((q, "all-hidden") for q in quantised)):
        with int8_hidden_rows(quantised[name]) if name in quantised else nullcontext():
            system = HiddenRowsSystem(hybrid, args.chunk)
            greedy = system.greedy(prompts, args.max_tokens)
            reference = reference or greedy  # the KV cache's continuations, scored by every system
            results[name] = {"greedy": greedy, "scored": system.scored(prompts, reference)}
            del system
        print(f"{name}: done after {time.perf_counter() - start_s:.0f} s", flush=True)
    pairs = [(name, "kv") for name in ("hidden-fp32", *quantised)]
    comparisons = {f"{a} vs {b}": compare(results[a], results[b]) for a, b in pairs}
    for name, figures in comparisons.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()), flush=True)
    write_json(Path(args.out_dir) / "hidden_int8_accuracy.json", {
        "benchmark": "hidden_int8_accuracy", "config": vars(args), "num_prompts": len(prompts),
        "seconds": round(time.perf_counter() - start_s, 1),
        "int8_round_trip_error": int8_error(prompts, args.group_size), "comparisons": comparisons})
    return 0


if __name__ == "__main__":
    sys.exit(main())
