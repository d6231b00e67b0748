"""The OpenAI sampling surface through the official client on the real default model: log probabilities (equal to
HF's log-softmax in fp32), penalties (equal to a reference loop over HF's logits), min_p, min_tokens, logit_bias,
/tokenize and /detokenize, and a clear 400 for every bad value."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aptserve.engine import LLMEngine
from aptserve.engine_args import EngineArgs
from aptserve.registry import resolve_model
from tests.test_logits_processing import reference
from tests.test_server import FRANCE, MODEL, running_server

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


@pytest.fixture(scope="module")
def live():
    # float32, not auto (bf16 on AVX-512 BF16 CPUs): the answers are checked against HF float32.
    with running_server(LLMEngine.from_engine_args(EngineArgs(model=MODEL, dtype="float32", kv_cache_memory=64 << 20,
                                                              max_num_seqs=8))) as server:
        yield server


@pytest.fixture(scope="module")
def hf():
    path = resolve_model(MODEL)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def hf_greedy_logprobs(hf, prompt_ids: list[int], num_tokens: int, params=None) -> tuple[list[int], torch.Tensor]:
    """HF's greedy tokens (after `params`' penalties, applied by the reference) and the raw log-softmax of each
    position's logits, token by token."""
    model, _ = hf
    ids, logprobs, cache, new_ids = list(prompt_ids), [], None, list(prompt_ids)
    with torch.inference_mode():
        for _ in range(num_tokens):
            out = model(torch.tensor([new_ids]), cache=cache, use_cache=True, logits_to_keep=1)
            cache, logits = out.cache, out.logits[0, -1].float()
            logprobs.append(torch.log_softmax(logits, -1))
            if params is not None:
                logits = torch.tensor(reference(logits.tolist(), params, prompt_ids, ids[len(prompt_ids):]))
            ids.append(int(logits.argmax()))
            new_ids = ids[-1:]
    return ids[len(prompt_ids):], torch.stack(logprobs)


def streamed_text(client, **kwargs) -> str:
    """The text of a streamed completion (or chat, given messages), its events joined."""
    if "messages" in kwargs:
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True)
                       if c.choices)
    return "".join(e.choices[0].text for e in client.completions.create(**kwargs, stream=True) if e.choices)


def test_completion_logprobs_equal_hf_streamed_or_not(live, hf):
    _, tokenizer = hf
    prompt_ids = tokenizer(PROMPT).input_ids
    tokens, logprobs = hf_greedy_logprobs(hf, prompt_ids, 8)
    client = live.client()
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    assert whole.tokens == [tokenizer.decode([t]) for t in tokens]
    expected = [float(logprobs[i, t]) for i, t in enumerate(tokens)]
    assert whole.token_logprobs == pytest.approx(expected, rel=1e-4)
    for i, top in enumerate(whole.top_logprobs):
        best = logprobs[i].topk(3)
        assert list(top) == [tokenizer.decode([t]) for t in best.indices.tolist()]
        assert list(top.values()) == pytest.approx(best.values.tolist(), rel=1e-4)
    assert whole.text_offset == [sum(map(len, whole.tokens[:i])) for i in range(8)]

    events = [e.choices[0].logprobs for e in client.completions.create(**kwargs, stream=True) if e.choices]
    streamed = [e for e in events if e is not None]
    assert sum((e.tokens for e in streamed), []) == whole.tokens
    assert sum((e.token_logprobs for e in streamed), []) == pytest.approx(whole.token_logprobs, rel=1e-4)
    assert sum((e.text_offset for e in streamed), []) == whole.text_offset  # offsets continue across events


def test_chat_logprobs_and_top_logprobs_streamed_or_not(live):
    client = live.client()
    kwargs = dict(model=MODEL, messages=FRANCE, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    choice = client.chat.completions.create(**kwargs).choices[0]
    content = choice.logprobs.content
    shown = [t.token for t in content][:-1 if choice.finish_reason == "stop" else None]  # less EOS, not in the text
    assert "".join(shown) == choice.message.content
    for token in content:  # greedy: the chosen token is the most likely one
        assert len(token.top_logprobs) == 2 and token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
        assert token.logprob >= token.top_logprobs[1].logprob
        assert token.bytes == list(token.token.encode())
    chunks = [c.choices[0] for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    streamed = [t for c in chunks if c.logprobs for t in c.logprobs.content]
    assert [(t.token, pytest.approx(t.logprob)) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4).choices[0]
    assert plain.logprobs is None


@pytest.mark.parametrize("params", [
    dict(frequency_penalty=1.0),
    dict(presence_penalty=1.5, repetition_penalty=1.2),
    dict(repetition_penalty=1.6, frequency_penalty=-0.5),
])
def test_penalties_equal_a_reference_over_hf_logits(live, hf, params):
    from aptserve.sampling import SamplingParams

    _, tokenizer = hf
    prompt = "one two one two one two one two"
    prompt_ids = tokenizer(prompt).input_ids
    expected, _ = hf_greedy_logprobs(hf, prompt_ids, 20, SamplingParams(temperature=0, **params))
    unpenalized, _ = hf_greedy_logprobs(hf, prompt_ids, 20)
    assert expected != unpenalized  # the penalty changes what greedy picks, so this can fail
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, extra_body={"ignore_eos": True, **params})
    got = live.client().completions.create(**kwargs, logprobs=0)
    assert got.choices[0].logprobs.tokens == [tokenizer.decode([t]) for t in expected]
    assert streamed_text(live.client(), **kwargs) == got.choices[0].text == tokenizer.decode(expected)


def test_min_p_one_is_greedy_and_logit_bias_forces_a_token(live, hf):
    _, tokenizer = hf
    client = live.client()
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    min_p = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=1, extra_body={"min_p": 1.0})
    assert client.completions.create(**min_p).choices[0].text == streamed_text(client, **min_p) == greedy
    bias = dict(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logit_bias={"1000": 100})
    forced = client.completions.create(**bias).choices[0].text
    assert forced == streamed_text(client, **bias) == tokenizer.decode([1000] * 5)


def test_min_tokens_holds_eos_back(live):
    client = live.client()
    short = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=64, temperature=0)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 30
    kwargs = dict(model=MODEL, messages=FRANCE, max_tokens=64, temperature=0, extra_body={"min_tokens": 30})
    held = client.chat.completions.create(**kwargs)
    assert held.usage.completion_tokens >= 30
    assert held.choices[0].message.content.startswith(short.choices[0].message.content)
    assert streamed_text(client, **kwargs) == held.choices[0].message.content


@pytest.mark.parametrize("chat, kwargs, field", [
    (False, {"logprobs": 21}, "logprobs"),
    (True, {"top_logprobs": 2}, "top_logprobs"),
    (False, {"presence_penalty": 3}, "presence_penalty"),
    (False, {"frequency_penalty": -2.5}, "frequency_penalty"),
    (False, {"logit_bias": {"x": 1}}, "logit_bias"),
    (False, {"logit_bias": {"99999999": 1}}, "logit_bias"),
    (True, {"logit_bias": {"5": 200}}, "logit_bias"),
    (False, {"extra_body": {"min_tokens": 9}, "max_tokens": 4}, "min_tokens"),
    (False, {"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    (True, {"extra_body": {"min_p": -0.1}}, "min_p"),
])
def test_bad_sampling_values_are_a_400_naming_the_field(live, chat, kwargs, field):
    client = live.client()
    with pytest.raises(openai.BadRequestError, match=field):
        if chat:
            client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4, **kwargs)
        else:
            client.completions.create(model=MODEL, prompt="hi", **{"max_tokens": 4, **kwargs})
    live.wait_idle()


def test_tokenize_and_detokenize(live, hf):
    _, tokenizer = hf
    tokenized = httpx.post(f"{live.base_url}/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
    assert tokenized["tokens"] == tokenizer(PROMPT).input_ids and tokenized["count"] == len(tokenized["tokens"])
    assert tokenized["max_model_len"] == live.engine.config.model.max_model_len
    chat = httpx.post(f"{live.base_url}/tokenize", json={"messages": FRANCE, "return_token_strs": True}).json()
    text = tokenizer.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
    assert chat["token_strs"] == tokenizer.convert_ids_to_tokens(chat["tokens"])
    back = httpx.post(f"{live.base_url}/detokenize", json={"tokens": tokenized["tokens"]}).json()
    assert back["prompt"] == PROMPT
    for path, body in (("/tokenize", {}), ("/tokenize", {"prompt": "a", "messages": FRANCE}),
                       ("/tokenize", {"messages": []}),
                       ("/detokenize", {"tokens": [10**9]}), ("/tokenize", {"prompt": "a", "model": "nope"})):
        response = httpx.post(f"{live.base_url}{path}", json=body)
        assert response.status_code == 400 and response.json()["error"]["message"], (path, body)


def test_n_choices_streamed_or_not_share_the_prompt_and_sum_the_usage(live):
    client = live.client()
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs, n=3)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.text for c in whole.choices]
    assert len(set(texts)) > 1  # seed + i per choice: they differ, and the answer is reproducible
    assert [c.text for c in client.completions.create(**kwargs, n=3).choices] == texts
    assert texts[0] == client.completions.create(**kwargs).choices[0].text  # choice 0 is the n=1 answer
    assert whole.usage.prompt_tokens == client.completions.create(**kwargs).usage.prompt_tokens
    assert whole.usage.completion_tokens == 18  # 3 x max_tokens
    streamed = {0: "", 1: "", 2: ""}
    usage = None
    for event in client.completions.create(**kwargs, n=3, stream=True, stream_options={"include_usage": True}):
        for choice in event.choices:
            streamed[choice.index] += choice.text
        usage = event.usage or usage
    assert [streamed[i] for i in range(3)] == texts and usage.completion_tokens == 18
    chat = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=5, n=2, temperature=0)
    assert [c.message.content for c in chat.choices] == [chat.choices[0].message.content] * 2  # greedy: equal
    roles = [c.delta.role for e in client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=3, n=2,
                                                                     stream=True) for c in e.choices]
    assert roles.count("assistant") == 2  # each choice's first event carries the role
    live.wait_idle()
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=0)


def test_echo_returns_the_prompt_and_hf_teacher_forced_logprobs(live, hf):
    model, tokenizer = hf
    prompt = " ".join([PROMPT] * 30)  # about 600 tokens: more than one prompt chunk of 512
    prompt_ids = tokenizer(prompt).input_ids
    with torch.inference_mode():
        teacher = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0, :-1].float(), -1)
    expected = teacher.gather(1, torch.tensor(prompt_ids[1:])[:, None])[:, 0].tolist()
    client = live.client()
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)  # its blocks are cached now
    whole = client.completions.create(**kwargs)
    choice, n = whole.choices[0], len(prompt_ids)
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    assert choice.logprobs.tokens[:n] == [tokenizer.decode([t]) for t in prompt_ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:n] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert len(choice.logprobs.tokens) == n + 3
    assert whole.usage.prompt_tokens_details.cached_tokens == 0  # scored, so computed, not served from the cache
    events = [e.choices[0] for e in client.completions.create(**kwargs, stream=True) if e.choices]
    assert "".join(e.text for e in events) == choice.text
    assert sum((e.logprobs.token_logprobs for e in events), []) == pytest.approx(choice.logprobs.token_logprobs)
    assert client.completions.create(**{**kwargs, "logprobs": None}).choices[0].text == choice.text


def test_n_choices_share_one_scoring_of_the_echoed_prompt(live, hf, monkeypatch):
    import aptserve.runner.model_runner as model_runner

    scored, score = set(), model_runner.prompt_logprobs

    def counting(model, hidden, request, first_row):
        scored.add(request.request_id)
        return score(model, hidden, request, first_row)

    monkeypatch.setattr(model_runner, "prompt_logprobs", counting)
    num_prompt_tokens = len(hf[1](PROMPT).input_ids)
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, logprobs=2, echo=True)
    client = live.client()
    alone = client.completions.create(**kwargs).choices[0].logprobs
    scored.clear()
    whole = client.completions.create(**kwargs, n=3)
    assert len(scored) == 1  # one scoring for the three choices
    for choice in whole.choices:
        assert choice.text.startswith(PROMPT)
        assert choice.logprobs.tokens[:num_prompt_tokens] == alone.tokens[:num_prompt_tokens]
        assert choice.logprobs.token_logprobs[:num_prompt_tokens] == pytest.approx(
            alone.token_logprobs[:num_prompt_tokens], abs=1e-5)
    firsts = {}
    for event in client.completions.create(**kwargs, n=3, stream=True):
        for choice in event.choices:
            firsts.setdefault(choice.index, choice)
    assert sorted(firsts) == [0, 1, 2]
    for choice in firsts.values():  # each choice's first event carries the prompt and its scores
        assert choice.text.startswith(PROMPT)
        assert choice.logprobs.token_logprobs[1:num_prompt_tokens] == pytest.approx(
            alone.token_logprobs[1:num_prompt_tokens], abs=1e-5)
