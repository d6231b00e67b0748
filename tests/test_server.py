"""The OpenAI server end to end on the real default model (SmolLM2-135M-Instruct): the real server under
uvicorn on 127.0.0.1, driven by the official `openai` client. Also the request-schema mapping, no server."""
from __future__ import annotations

import contextlib
import functools
import itertools
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aptserve.cli import build_parser, cmd_serve
from aptserve.detokenizer import releasable_len
from aptserve.engine import LLMEngine
from aptserve.engine_args import EngineArgs
from aptserve.server import AsyncLLM, DrainingServer, ServerArgs, build_server, create_app
from aptserve.server.protocol import ChatCompletionRequest, CompletionRequest

MODEL = "default"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


# --- helpers shared with test_server_robustness.py -----------------------------------------------
@dataclass
class LiveServer:
    base_url: str
    engine: LLMEngine
    server: DrainingServer
    thread: threading.Thread

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="x", **{"max_retries": 0, "timeout": 60, **kwargs})

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when absent)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until no request is left and every cache unit is back in the pool; then the invariants hold."""
        engine, cache = self.engine, self.engine.cache
        wait_until(lambda: not engine.has_unfinished_requests() and cache.num_free_units == cache.num_units,
                   timeout_s, "every request to finish and every unit to return")
        self.engine.scheduler.check_invariants()


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.02)


@contextlib.contextmanager
def running_server(engine: LLMEngine, shutdown_timeout_s: float = 30.0, uvicorn_options: dict | None = None,
                   **server_args):
    """The real app under uvicorn on a free loopback port, in a background thread; `server_args` are ServerArgs
    fields, `uvicorn_options` build_server's connection options."""
    args = ServerArgs(**server_args)
    app = create_app(AsyncLLM.in_thread(engine.core, engine.tokenizer, args), args)
    server = build_server(app, shutdown_timeout_s=shutdown_timeout_s, access_log=False, log_level="warning",
                          **(uvicorn_options or {}))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 60, "the server to start")
        assert server.started, "the server failed to start"
        yield LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, server, thread)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


# --- the real model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live():
    args = EngineArgs(model=MODEL, kv_cache_memory=64 << 20, max_num_seqs=8)
    with running_server(LLMEngine.from_engine_args(args)) as server:
        yield server


@functools.cache
def greedy_chat_answer(base_url: str) -> str:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)
    return client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=16,
                                          temperature=0).choices[0].message.content


def test_models_health_and_openapi(live):
    assert [m.id for m in live.client().models.list().data] == [MODEL]
    assert httpx.get(f"{live.base_url}/health").status_code == 200
    paths = httpx.get(f"{live.base_url}/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(paths)


def test_completion_text_usage_and_prompt_forms(live):
    client, prompt = live.client(), "The capital of France is"
    prompt_ids = live.engine.tokenizer(prompt).input_ids
    texts = []
    for form in (prompt, prompt_ids, [prompt]):
        out = client.completions.create(model=MODEL, prompt=form, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].finish_reason == "length"
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt_ids), 6)
        assert out.usage.total_tokens == len(prompt_ids) + 6
        texts.append(out.choices[0].text)
    assert "Paris" in texts[0]
    assert texts[1] == texts[2] == texts[0]


def test_chat_answers_with_real_text(live):
    out = live.client().chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=16, temperature=0)
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "stop"  # the model's EOS, before max_tokens
    assert 0 < out.usage.completion_tokens < 16
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_stream_sends_one_event_per_token(live):
    client, prompt = live.client(), "Once upon a time"
    args = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    token_events, usage_event = chunks[:-1], chunks[-1]
    assert len(token_events) == 8 == usage_event.usage.completion_tokens
    assert usage_event.choices == []
    assert [c.choices[0].finish_reason for c in token_events] == [None] * 7 + ["length"]
    full = client.completions.create(**args).choices[0].text
    assert "".join(c.choices[0].text for c in token_events) == full


def test_chat_stream_sends_one_event_per_token(live):
    chunks = list(live.client().chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    token_events, usage_event = chunks[:-1], chunks[-1]
    assert len(token_events) == usage_event.usage.completion_tokens
    assert token_events[0].choices[0].delta.role == "assistant"
    assert token_events[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content for c in token_events) == greedy_chat_answer(live.base_url)


def test_stop_strings_end_the_text_before_the_match(live):
    full = greedy_chat_answer(live.base_url)
    assert "France is Paris" in full
    client = live.client()
    out = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=16, temperature=0,
                                         stop=["Paris"])
    assert out.choices[0].message.content == full[:full.index("Paris")]
    assert out.choices[0].finish_reason == "stop"
    # A stop string spanning tokens: its first tokens must be held back, never streamed, then dropped.
    stop = "France is P"
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=16, temperature=0,
                                                 stop=stop, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content for c in chunks[:-1]) == full[:full.index(stop)]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert len(chunks) - 1 == chunks[-1].usage.completion_tokens


def test_seeded_sampling_is_reproducible(live):
    client = live.client()

    def sample(seed: int) -> str:
        out = client.completions.create(model=MODEL, prompt="My favourite animal is", max_tokens=8,
                                        temperature=1.0, seed=seed, extra_body={"ignore_eos": True})
        return out.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1), sample(2)}) > 1, "different seeds should not all give the same text"


def test_abort_mid_stream_frees_every_unit(live):
    num_aborted = live.metric("aptserve:request_success_total", finished_reason="abort")
    stream = live.client().completions.create(model=MODEL, prompt="Count to one thousand:", max_tokens=500,
                                              temperature=0, stream=True, extra_body={"ignore_eos": True})
    events = list(itertools.islice(stream, 3))
    assert len(events) == 3 and live.engine.cache.num_free_units < live.engine.cache.num_units
    stream.close()
    live.wait_idle()
    assert live.metric("aptserve:request_success_total", finished_reason="abort") == num_aborted + 1


BAD_REQUESTS = [
    ("completions", '{"model": "default", "prompt": ', None),  # malformed JSON
    ("completions", {"model": "default", "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ("completions", {"model": "default", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"model": "default", "prompt": "hi", "temperature": -1}, "temperature"),
    ("completions", {"model": "default", "prompt": "hi", "n": 65}, "n"),  # more choices than MAX_CHOICES
    ("completions", {"model": "default", "prompt": "hi", "stop": [""]}, None),
    ("completions", {"model": "default", "prompt": ["one", "two"]}, None),
    ("completions", {"model": "default", "prompt": [10**9]}, None),
    ("completions", {"model": "default", "prompt": [5] * 8192}, None),  # longer than the context
    ("completions", {"model": "default"}, "prompt"),
    ("completions", [1, 2], None),
    ("completions", '{"model": "default", "prompt": "a lone \\ud800 surrogate"}', None),
    ("chat/completions", {"model": "default", "messages": []}, "messages"),
    ("chat/completions", {"model": "default", "messages": FRANCE, "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("chat/completions", {"model": "default", "messages": [{"role": "robot", "content": "hi"}]}, "messages"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS)
def test_bad_requests_get_400_with_openai_error_body(live, path, body, param):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    response = httpx.post(f"{live.base_url}/v1/{path}", headers={"content-type": "application/json"},
                          timeout=30, **kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_a_pool_below_the_model_context_caps_it_and_chat_without_max_tokens_is_served(live):
    # 64 MiB holds ~1,450 tokens of SmolLM2 in fp32, not its 8,192: the server starts with what fits.
    max_model_len = live.engine.config.model.max_model_len
    assert 1000 < max_model_len < 8192
    assert live.client().models.list().data[0].model_extra["max_model_len"] == max_model_len
    answer = live.client().chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert answer.choices[0].finish_reason == "stop" and "Paris" in answer.choices[0].message.content


def test_unknown_model_is_400_model_not_found(live):
    with pytest.raises(openai.BadRequestError) as info:
        live.client().completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert info.value.code == "model_not_found" and info.value.param == "model"


def test_metrics_report_requests_latencies_and_cache(live):
    live.client().completions.create(model=MODEL, prompt="Hello", max_tokens=2,
                                     extra_body={"ignore_eos": True})
    live.wait_idle()
    assert live.metric("aptserve:request_success_total", finished_reason="length") >= 1
    assert live.metric("aptserve:time_to_first_token_seconds_count") >= 1
    assert live.metric("aptserve:inter_token_latency_seconds_count") >= 1
    assert live.metric("aptserve:cache_units_total") == live.engine.cache.num_units
    assert live.metric("aptserve:cache_units_used", kind="kv") == 0
    assert live.metric("aptserve:admissions_total", kind="kv") >= 1
    assert live.metric("aptserve:admissions_total", kind="hidden") == 0  # SmolLM2 is GQA: the hidden cache is off
    assert live.metric("aptserve:num_demotions_total") == live.metric("aptserve:num_preemptions_total") == 0
    assert live.metric("aptserve:num_requests_running") == live.metric("aptserve:num_requests_waiting") == 0


# --- the request schemas, no server --------------------------------------------------------------
def test_request_fields_map_onto_sampling_params():
    request = CompletionRequest(model=MODEL, prompt=[[3, 4]], max_tokens=5, temperature=0.5, top_p=0.9,
                                top_k=-1, seed=7, stop="END", stop_token_ids=[9], ignore_eos=True)
    params = request.to_sampling_params()
    assert request.prompt_input() == [3, 4]
    assert (params.max_tokens, params.temperature, params.top_p) == (5, 0.5, 0.9)
    assert (params.top_k, params.seed) == (0, 7)
    assert (params.stop, params.stop_token_ids, params.ignore_eos) == (("END",), (9,), True)
    chat = ChatCompletionRequest(model=MODEL, messages=FRANCE, max_tokens=3, max_completion_tokens=4)
    assert chat.to_sampling_params().max_tokens == 4
    assert ChatCompletionRequest(model=MODEL, messages=FRANCE).to_sampling_params().max_tokens is None


@pytest.mark.parametrize("text,stop,expected", [
    ("Hello wor", ("world",), len("Hello ")),  # "wor" may still become "world"
    ("Hello w", ("world", "Hello w!"), 0),  # the longest match counts
    ("Hello", ("xyz",), len("Hello")),
    ("ab", ("abc",), 0),
])
def test_stream_holds_back_only_what_a_stop_string_may_still_match(text, stop, expected):
    assert releasable_len(text, stop) == expected


def test_serve_flags_follow_vllm_names():
    args = build_parser().parse_args(["serve", "--model", "default", "--served-model-name", "a", "b",
                                      "--port", "9000", "--max-queue-len", "16", "--ttft-slo", "0.5",
                                      "--tbt-slo", "0.1", "--max-num-seqs", "4", "--kv-cache-memory", "64M"])
    assert args.func is cmd_serve
    assert (args.served_model_name, args.port, args.max_queue_len) == (["a", "b"], 9000, 16)
    assert (args.ttft_slo, args.tbt_slo, args.max_num_seqs, args.kv_cache_memory) == (0.5, 0.1, 4, 64 << 20)


def test_a_repeated_prompt_is_served_from_the_prefix_cache_and_says_so(live):
    """OpenAI's usage.prompt_tokens_details.cached_tokens, and vLLM's prefix-cache counters on /metrics."""
    client = live.client()
    prompt = "Here is a long system prompt that every turn repeats, word for word. " * 6
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    block_size = live.engine.config.cache.block_size
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == (again.usage.prompt_tokens - 1) // block_size * block_size > 0  # the last token is computed
    assert again.choices[0].text == first.choices[0].text
    metrics = httpx.get(f"{live.base_url}/metrics").text
    hits = float(next(line.split()[-1] for line in metrics.splitlines()
                      if line.startswith("aptserve:prefix_cache_hits_total")))
    assert hits >= cached and "aptserve:prefix_cache_hit_rate" in metrics
