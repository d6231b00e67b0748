"""Structured output on the real default model: every answer parses and validates (jsonschema) on 24 sampled requests
served across preemption, each kind (JSON schema, JSON object, regex, choice, Lark grammar) through the official
client, under every scheduler policy offline, and a clear 400 for a constraint that cannot compile.

Issue 25: constraints are compiled at the door, against a tokenizer view built at start-up, and never inside a
step: what llguidance refuses (a 50 KB regex, a grammar that matches nothing) is a 400 that leaks nothing, a choice
of 5,000 options is served, a constraint is compiled once (an LRU by its text), and a grammar the engine core has
not seen compiles in a worker while the step runs the other requests."""
from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import openai
import pytest

from aptserve import LLM, SamplingParams
from aptserve.cache.geometry import bytes_per_unit
from aptserve.core.messages import EngineCoreRequest
from aptserve.engine import LLMEngine
from aptserve.engine_args import EngineArgs
from aptserve.errors import InvalidRequestError
from aptserve.grammar_compiler import GrammarCompiler
from aptserve.registry import load_model_config, resolve_model
from aptserve.structured_output import StructuredOutput
from tests.test_server import FRANCE, MODEL, running_server, wait_until

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
    args = EngineArgs(model=MODEL, dtype="float32", kv_cache_memory=tight_budget(), max_num_seqs=8)  # budget's dtype
    with running_server(LLMEngine.from_engine_args(args)) as server:
        yield server


def test_sampled_json_schema_answers_validate_across_preemption(tight):
    client = tight.client(timeout=300)
    preemptions_before = tight.engine.scheduler.num_preemptions
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

    import concurrent.futures

    def ask(seed: int) -> str:
        return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, temperature=1.0, seed=seed,
                                              response_format=response_format).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(24)))  # three waves of 8 over 24 blocks: the batch preempts
    for answer in answers:
        jsonschema.validate(json.loads(answer), PERSON)
    assert len(set(answers)) > 8  # sampled, not one answer
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
    prompts = ["Describe a person as JSON: "] * 6
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
    compiler = GrammarCompiler.for_model(load_model_config(resolve_model(MODEL)))
    with pytest.raises(InvalidRequestError, match="regex constraint cannot be used"):
        compiler.compile(StructuredOutput("regex", "[a-"))
    compiler.compile(StructuredOutput("json", json.dumps(PERSON)))


# --- compiled at the door and off the step (issue 25) ---------------------------------------------------------
HUGE_REGEX = "(a|aa)*" * 7142 + "b"  # 50 KB: its lexer cannot be precomputed within llguidance's limits
CHOICES_5000 = [str(i) for i in range(5000)]


def test_grammar_tokenizer_is_built_at_start_up_and_shared_with_the_door(tight):
    compiler = tight.engine.core.grammar_compiler
    assert compiler is not None and compiler.ll_tokenizer.vocab_size == tight.engine.config.model.vocab_size
    assert tight.engine.input_processor.grammars is compiler  # one tokenizer view per process
    assert tight.engine.executor.grammars._executor is not None  # the mask's threads too


@pytest.mark.parametrize("structured, message", [
    ({"regex": HUGE_REGEX}, "lexer precomputation failed"),
    ({"grammar": "start: a\na: a"}, "matches no text"),
])
def test_constraints_the_compiler_refuses_are_a_400_and_leak_nothing(tight, structured, message):
    client = tight.client(timeout=300)
    compiles = tight.engine.core.grammar_compiler.num_compiles
    for _ in range(2):  # the second refusal comes from the cache
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model=MODEL, prompt="hi", max_tokens=4, n=2,
                                      extra_body={"structured_outputs": structured})
    assert tight.engine.core.grammar_compiler.num_compiles == compiles + 1
    tight.wait_idle()
    assert tight.engine.cache.num_free_units == tight.engine.cache.num_units
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=3).choices[0].text  # still serving


def test_a_choice_of_5000_options_is_one_lexeme_and_served(tight):
    answer = tight.client(timeout=300).completions.create(
        model=MODEL, prompt="Pick a number:", max_tokens=8, temperature=1.0, seed=7, n=4,
        extra_body={"structured_outputs": {"choice": CHOICES_5000}})
    assert all(c.text in CHOICES_5000 and c.finish_reason == "stop" for c in answer.choices)
    tight.wait_idle()
    assert tight.engine.cache.num_free_units == tight.engine.cache.num_units


def test_a_constraint_is_compiled_once_and_the_cache_is_bounded():
    compiler = GrammarCompiler.for_model(load_model_config(resolve_model(MODEL)))
    compiler.cache_size = 2
    first = compiler.compile(StructuredOutput("regex", "[ab]+"))
    assert compiler.compile(StructuredOutput("regex", "[ab]+")) is first and compiler.num_compiles == 1
    for regex in ("a+", "b+", "[ab]+"):
        compiler.compile(StructuredOutput("regex", regex))
    assert compiler.num_compiles == 4  # "[ab]+" was evicted by the two after it
    mine, other = (compiler.matcher(StructuredOutput("regex", "[ab]+")) for _ in range(2))
    assert mine.consume_tokens(compiler.ll_tokenizer.tokenize_str("ab"))
    assert mine.is_accepting() and not other.is_accepting()  # each request's matcher is its own copy


def test_a_new_grammar_compiles_in_a_worker_while_the_step_runs_others(monkeypatch):
    """Straight to the core, as the engine-core process gets a request: its compiler has not seen the constraint,
    so the request waits beside the scheduler while a worker compiles it; no compile runs on the stepping thread."""
    engine = LLMEngine.from_engine_args(EngineArgs(model=MODEL, kv_cache_memory=tight_budget(), max_num_seqs=8))
    compiler, threads = engine.core.grammar_compiler, []
    real_compile = compiler.compile
    monkeypatch.setattr(compiler, "compile", lambda s: threads.append(threading.current_thread().name) or
                        real_compile(s))
    bystander = engine.add_request("Tell me a story.", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    engine.step()
    params = SamplingParams(temperature=0, max_tokens=8, structured=StructuredOutput.choice(CHOICES_5000))
    prompt_ids = engine.tokenizer("Pick a number:").input_ids
    request = EngineCoreRequest("constrained", prompt_ids, params, engine.clock.now())
    engine.output_processor.add_request("constrained", None, prompt_ids, params, request.arrival_s)
    engine.core.add_request(request)
    assert "constrained" not in engine.scheduler.requests and engine.core.stats().num_waiting == 1
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert outputs["constrained"].outputs[0].text in CHOICES_5000
    assert len(outputs[bystander.request_id].outputs[0].token_ids) == 40
    assert threads and all(name.startswith("aptserve-grammar") for name in threads)
    assert engine.cache.num_free_units == engine.cache.num_units


@pytest.mark.slow
def test_served_in_a_process_constraints_are_checked_at_the_door_and_the_core_keeps_serving():
    """`aptserve serve` as users run it (the core in its own process, which compiles again off the step)."""
    from tests.test_engine_process import serving

    with serving("--max-queue-len", "32") as (base_url, _):
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=300)
        first = client.completions.create(model=MODEL, prompt="Say:", max_tokens=6,
                                          extra_body={"structured_outputs": {"regex": "[ab]+"}})
        assert re.fullmatch("[ab]+", first.choices[0].text)
        for structured, message in [({"regex": HUGE_REGEX}, "lexer precomputation failed"),
                                    ({"grammar": "start: a\na: a"}, "matches no text")]:
            with pytest.raises(openai.BadRequestError, match=message):
                client.completions.create(model=MODEL, prompt="hi", max_tokens=4, n=4,
                                          extra_body={"structured_outputs": structured})
        picked = client.completions.create(model=MODEL, prompt="Pick a number:", max_tokens=8, n=4, temperature=1.0,
                                           extra_body={"structured_outputs": {"choice": CHOICES_5000}})
        assert all(c.text in CHOICES_5000 for c in picked.choices)
        wait_until(lambda: _units_used(base_url) == 0, 60, "the pool to be free")
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=3).choices[0].text


def _units_used(base_url: str) -> float:
    lines = httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("aptserve:cache_units_used"))
