"""Structured output on the real default model: every answer parses and validates (jsonschema) on 50 sampled requests
served across preemption, each kind (JSON schema, JSON object, regex, choice, Lark grammar) through the official
client, under every scheduler policy offline, and a clear 400 for a constraint that cannot compile."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from aptserve import LLM, SamplingParams
from aptserve.cache.geometry import bytes_per_unit
from aptserve.engine import LLMEngine
from aptserve.engine_args import EngineArgs
from aptserve.errors import InvalidRequestError
from aptserve.registry import load_model_config, resolve_model
from aptserve.structured_output import StructuredOutput
from tests.test_server import FRANCE, MODEL, running_server

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON with a name, an age and some tags."}]


def tight_budget() -> int:
    """KV bytes for 24 blocks (384 tokens): a batch of 8 of these requests preempts as it grows."""
    config = load_model_config(resolve_model(MODEL))
    return bytes_per_unit(config, 16, "float32") * 2 * 24


@pytest.fixture(scope="module")
def tight():
    args = EngineArgs(model=MODEL, kv_cache_memory=tight_budget(), max_num_seqs=8)
    with running_server(LLMEngine.from_engine_args(args)) as server:
        yield server


def test_fifty_sampled_json_schema_answers_validate_across_preemption(tight):
    client = tight.client(timeout=300)
    preemptions_before = tight.engine.scheduler.num_preemptions
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

    import concurrent.futures

    def ask(seed: int) -> str:
        return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, temperature=1.0, seed=seed,
                                              response_format=response_format).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(50)))
    for answer in answers:
        jsonschema.validate(json.loads(answer), PERSON)
    assert len(set(answers)) > 10  # sampled, not one answer
    assert tight.engine.scheduler.num_preemptions > preemptions_before  # matchers kept their place across recompute
    tight.wait_idle()


def test_each_kind_through_the_client_streamed_or_not(tight):
    client = tight.client(timeout=120)
    # Greedy, so the object closes within max_tokens (a sampled one may nest on and be cut at the length limit).
    city = [{"role": "user", "content": "Give the capital of France as a JSON object with a key city."}]
    kwargs = dict(model=MODEL, messages=city, max_tokens=100, temperature=0, response_format={"type": "json_object"})
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "stop" and json.loads(choice.message.content) == {"city": "Paris"}
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True)
                       if c.choices)
    assert streamed == choice.message.content
    phone = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, temperature=1.0, seed=3,
                                      extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}}).choices[0].text
    assert re.fullmatch(r"\d{3}-\d{4}", phone)
    answer = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=10, temperature=1.0, seed=4,
                                            extra_body={"structured_outputs": {"choice": ["Paris", "Lyon", "a \"b\""]}})
    assert answer.choices[0].message.content in ("Paris", "Lyon", 'a "b"')
    lark = 'start: "x" NUMBER\nNUMBER: /[0-9]{1,3}/'
    grammar = client.completions.create(model=MODEL, prompt="Value:", max_tokens=10, temperature=1.0, seed=5,
                                        extra_body={"structured_outputs": {"grammar": lark}}).choices[0].text
    assert re.fullmatch(r"x[0-9]{1,3}", grammar)
    tight.wait_idle()


@pytest.mark.parametrize("structured, field", [
    ({"json": "{not json"}, "json constraint"),
    ({"regex": "("}, "regex"),
    ({"grammar": "start: missing_rule"}, "grammar"),
    ({"choice": []}, "choice"),
    ({"regex": "a", "choice": ["a"]}, "one structured output"),
])
def test_constraints_that_cannot_compile_are_a_400(tight, structured, field):
    with pytest.raises(openai.BadRequestError, match=field):
        tight.client().completions.create(model=MODEL, prompt="hi", max_tokens=4,
                                          extra_body={"structured_outputs": structured})
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        tight.client().chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4,
                                               response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    tight.wait_idle()


def test_structured_output_penalties_and_logprobs_under_every_policy():
    schema = StructuredOutput("json", json.dumps(PERSON))
    prompts = ["Describe a person as JSON: "] * 10
    for policy in ("fcfs", "chunked", "apt", "apt-chunked"):
        llm = LLM(model=MODEL, scheduler=policy, kv_cache_memory=tight_budget(), max_num_seqs=8)
        params = [SamplingParams(temperature=0.9, seed=i, max_tokens=200, structured=schema, logprobs=1,
                                 frequency_penalty=0.3) for i in range(len(prompts))]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        for output in outputs:
            completion = output.outputs[0]
            jsonschema.validate(json.loads(completion.text), PERSON)
            assert len(completion.logprobs) == len(completion.token_ids)
        assert llm.engine.cache.num_free_units == llm.engine.cache.num_units, policy


def test_kinds_are_checked_before_anything_runs():
    with pytest.raises(InvalidRequestError, match="kind"):
        StructuredOutput("yaml", "a: b")
    with pytest.raises(InvalidRequestError, match="does not compile"):
        StructuredOutput("regex", "[a-").check()
    StructuredOutput("json", json.dumps(PERSON)).check()
