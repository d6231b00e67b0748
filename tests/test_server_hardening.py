"""The server against a hostile but fair client: values the sampler cannot take, lax types, huge bodies and
prompts, idle connection floods, missing API keys. Each probe must fail alone, clearly and quickly, while other
clients' streams go on. On the simulator's executor with the real tokenizer (see test_server_robustness.py)."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

from aptserve.bench.bystander import Bystander
from aptserve.server.args import API_KEY_ENV, ServerArgs
from aptserve.server.guards import BoundedLoopErrorLog
from tests.test_server import running_server
from tests.test_server_robustness import POISON_TOKEN_ID, SIM, completion, sim_engine


def post(live, body: dict | bytes, path: str = "completions", **kwargs) -> httpx.Response:
    """POST `body` (a dict, or JSON already encoded) to /v1/`path`."""
    url = f"{live.base_url}/v1/{path}"
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30, **kwargs)
    return httpx.post(url, json=body, timeout=30, **kwargs)


@pytest.fixture(scope="module")
def live():
    with running_server(sim_engine(num_units=128, step_s=0.002)) as server:
        yield server


# --- validation at the door ------------------------------------------------------------------------
DOOR_REFUSALS = [
    ({"top_k": 9223372036854775808, "temperature": 1}, "top_k"),  # the sampler's int64 overflow
    ({"top_k": 49_153, "temperature": 1}, "vocabulary size 49152"),
    ({"max_tokens": "16"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"prompt": [True]}, "prompt"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"stop": [f"s{i}" for i in range(17)]}, "at most 16 strings"),
    ({"stop": "x" * 257}, "at most 256 characters"),
    ({"stop_token_ids": [49_152]}, "stop_token_ids"),
    ({"seed": 2**64}, "seed"),
]


@pytest.mark.parametrize("fields,expected", DOOR_REFUSALS)
def test_values_the_engine_cannot_take_are_refused_at_the_door(live, fields, expected):
    response = post(live, completion(**fields))
    assert response.status_code == 400, response.text
    assert expected in response.text
    live.wait_idle()


def test_chat_work_is_bounded_before_rendering_and_detokenize_takes_one_context():
    from aptserve.server.protocol import MAX_CHAT_ITEMS

    with running_server(sim_engine(num_units=128, step_s=0.03)) as live:
        _bounded_chat_and_detokenize(live, MAX_CHAT_ITEMS)


def _bounded_chat_and_detokenize(live, max_chat_items: int) -> None:
    many = [{"role": "user", "content": "a"}] * 200_000  # 5.8 MB: under the body limit
    # Encoded before the bystander starts: json.dumps of it holds this process's GIL ~0.25 s, which the server's
    # thread (in this process too) would wait out, a gap the client made, not the server.
    many_body = json.dumps({"model": SIM, "messages": many}).encode()
    ids_body = json.dumps({"model": SIM, "tokens": [100] * 1_000_000}).encode()
    bystander = Bystander(live.base_url, completion(max_tokens=100))  # >= 3 s: through every probe
    bystander.start()
    assert bystander.started.wait(30)
    for path in ("chat/completions", "../tokenize"):
        start = time.perf_counter()
        response = post(live, many_body, path)
        assert response.status_code == 400 and f"at most {max_chat_items} messages" in response.text, response.text
        assert time.perf_counter() - start < 2
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}] * max_chat_items}]
    assert post(live, {"model": SIM, "messages": parts}, "chat/completions").status_code == 400
    long_text = [{"role": "user", "content": "word " * 20_000}] * 10  # few messages, too much text for 128 tokens
    for path in ("chat/completions", "../tokenize"):
        response = post(live, {"model": SIM, "messages": long_text}, path)
        assert response.status_code == 400 and "characters" in response.text, response.text
    max_model_len = live.engine.config.model.max_model_len
    too_many = post(live, ids_body, "../detokenize")
    assert too_many.status_code == 400 and f"at most {max_model_len}" in too_many.text
    assert httpx.post(f"{live.base_url}/detokenize", json={"model": SIM, "tokens": [100] * max_model_len},
                      timeout=30).status_code == 200
    assert post(live, {"model": SIM, "messages": many[:10], "max_tokens": 2}, "chat/completions").status_code == 200
    assert bystander.is_alive(), "the probes should have run while the bystander streamed"
    bystander.join(60)
    assert bystander.num_events == 100 + 1 and bystander.largest_gap_s < 0.5, bystander.largest_gap_s
    live.wait_idle()


def test_messages_are_checked_per_role(live):
    no_content = post(live, {"model": SIM, "messages": [{"role": "user"}]}, "chat/completions")
    assert no_content.status_code == 400 and "user message needs content" in no_content.text
    tool_call_turn = [{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "user", "content": "go"}]
    assert post(live, {"model": SIM, "messages": tool_call_turn, "max_tokens": 2},
                "chat/completions").status_code == 200


def test_empty_model_means_the_served_model_and_tiny_values_are_served(live):
    for fields in ({"model": ""}, {"temperature": 1e-308}, {"top_p": 1e-300, "temperature": 1}):
        response = post(live, completion(**fields))
        assert response.status_code == 200, (fields, response.text)
        assert response.json()["model"] == SIM and response.json()["usage"]["completion_tokens"] == 8


def test_health_metrics_and_streams_answer_their_documented_types(live):
    health = httpx.get(f"{live.base_url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert httpx.get(f"{live.base_url}/metrics").headers["content-type"].startswith("text/plain")
    with httpx.stream("POST", f"{live.base_url}/v1/completions", json=completion(stream=True)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert list(response.iter_lines())[-2:] == ["data: [DONE]", ""]
    paths = httpx.get(f"{live.base_url}/openapi.json").json()["paths"]
    assert "text/event-stream" in paths["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]


# --- fault isolation -------------------------------------------------------------------------------
def test_a_failing_request_fails_alone_and_its_batch_goes_on():
    with running_server(sim_engine(num_units=128, max_num_seqs=8, step_s=0.01)) as live:
        async def run_all():
            async with httpx.AsyncClient(base_url=live.base_url, timeout=60) as client:
                ok = [client.post("/v1/completions", json=completion(max_tokens=20)) for _ in range(4)]
                poisoned = client.post("/v1/completions", json=completion(prompt=[5, POISON_TOKEN_ID]))
                return await asyncio.gather(poisoned, *ok)

        poisoned, *ok = asyncio.run(run_all())
        assert poisoned.status_code == 500 and "poisoned batch" in poisoned.json()["error"]["message"]
        assert [r.status_code for r in ok] == [200] * 4
        assert all(r.json()["usage"]["completion_tokens"] == 20 for r in ok)
        live.wait_idle()


# --- size limits -----------------------------------------------------------------------------------
def test_huge_bodies_and_prompts_are_refused_fast_while_streams_go_on():
    with running_server(sim_engine(num_units=128, step_s=0.03), max_request_body_bytes=8 << 20) as live:
        bystander = Bystander(live.base_url, completion(max_tokens=120))  # >= 3.6 s: through every probe
        bystander.start()
        assert bystander.started.wait(30)
        start = time.perf_counter()
        too_big = httpx.post(f"{live.base_url}/v1/completions", timeout=30,
                             content=b'{"model": "sim", "prompt": "' + b"a" * (10 << 20) + b'"}',
                             headers={"content-type": "application/json"})
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
        assert "--max-request-body-bytes" in too_big.json()["error"]["message"]
        chunked = httpx.post(f"{live.base_url}/v1/completions", timeout=30,
                             content=iter([b'{"model": "sim", "prompt": "', b"a" * (9 << 20), b'"}']),
                             headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        long_prompt = post(live, completion(prompt="word " * 1_000_000))  # 5 MB: within the body limit
        assert long_prompt.status_code == 400 and "characters" in long_prompt.json()["error"]["message"]
        junk = post(live, {**completion(), **{f"extra{i}": "x" * 1000 for i in range(9000)}})  # 9 MB of fields
        assert junk.status_code == 413
        assert time.perf_counter() - start < 10 and bystander.is_alive()
        bystander.join(60)
        assert bystander.num_events == 120 + 1 and bystander.largest_gap_s < 0.5, bystander.largest_gap_s
        live.wait_idle()


# --- connections ---------------------------------------------------------------------------------
def test_idle_connections_are_closed_and_do_not_starve_real_requests():
    options = {"header_read_timeout": 1.0, "limit_concurrency": 64}
    with running_server(sim_engine(num_units=128), uvicorn_options=options) as live:
        host, port = live.base_url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(100)]
        trickling = [socket.create_connection((host, int(port))) for _ in range(20)]
        for sock in trickling:  # a request head that never ends
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        over_the_limit = post(live, completion())
        assert over_the_limit.status_code == 503  # 120 connections held against a limit of 64
        for sock in idle + trickling:
            sock.settimeout(5)
            assert sock.recv(1024) == b"", "the server should close a connection that sends no request head"
            sock.close()
        assert post(live, completion()).status_code == 200
        live.wait_idle()


def test_loop_errors_are_logged_at_most_once_per_interval(caplog):
    log = BoundedLoopErrorLog(interval_s=60)
    error = OSError(24, "Too many open files")
    with caplog.at_level("ERROR"):
        for _ in range(1000):
            log(None, {"message": "socket.accept() out of system resource", "exception": error})
    assert len(caplog.records) == 1 and "Too many open files" in caplog.records[0].getMessage()


# --- authentication, docs, CORS ------------------------------------------------------------------
def test_api_key_guards_every_route_that_computes():
    with running_server(sim_engine(), api_key="sk-test") as live:
        tokenize, detokenize = {"model": SIM, "prompt": "hello"}, {"model": SIM, "tokens": [100] * 100_000}
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/completions", completion()),
                                   ("POST", "/v1/chat/completions", completion()), ("POST", "/tokenize", tokenize),
                                   ("POST", "/detokenize", detokenize), ("GET", "/no-such-route", None)):
            response = httpx.request(method, f"{live.base_url}{path}", json=body, timeout=30)
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == "invalid_api_key"
        authorized = {"Authorization": "Bearer sk-test"}
        assert httpx.post(f"{live.base_url}/tokenize", json=tokenize, headers=authorized).json()["count"] > 0
        assert httpx.post(f"{live.base_url}/detokenize", json={**detokenize, "tokens": [100]},
                          headers=authorized).status_code == 200
        wrong = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="sk-test", max_retries=0)
        assert right.completions.create(model=SIM, prompt=[5, 6], max_tokens=3).usage.completion_tokens == 3
        assert httpx.get(f"{live.base_url}/health").status_code == 200
        assert httpx.get(f"{live.base_url}/metrics").status_code == 200
        assert httpx.get(f"{live.base_url}/openapi.json").status_code == 200


def test_api_key_from_the_environment_can_guard_health_metrics_and_docs_can_go(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "sk-env")
    assert ServerArgs().api_key == "sk-env"
    with running_server(sim_engine(), protect_health_and_metrics=True, disable_docs=True,
                        allowed_origins=("https://app.example",)) as live:
        assert httpx.get(f"{live.base_url}/health").status_code == 401
        assert httpx.get(f"{live.base_url}/metrics").status_code == 401
        authorized = {"Authorization": "Bearer sk-env"}
        assert httpx.get(f"{live.base_url}/health", headers=authorized).status_code == 200
        assert httpx.get(f"{live.base_url}/docs").status_code == 404
        assert httpx.get(f"{live.base_url}/openapi.json").status_code == 404
        preflight = httpx.options(f"{live.base_url}/v1/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"


# --- start-up sanity -----------------------------------------------------------------------------
def test_a_pool_smaller_than_one_context_caps_max_model_len_and_warns_about_an_explicit_one(caplog):
    from aptserve.engine_args import resolve
    from tests.sim_fixtures import sim_args
    from tests.test_server_robustness import SIM_MODEL

    small = sim_args(SIM_MODEL, num_units=8, block_size=16)  # 4 KV blocks: 64 tokens of the model's 128
    with caplog.at_level("WARNING"):
        assert resolve(small, SIM_MODEL).model.max_model_len == 64
    assert "max_model_len capped from 128 to 64" in caplog.text
    caplog.clear()
    explicit = sim_args(SIM_MODEL, num_units=8, block_size=16, max_model_len=100)
    with caplog.at_level("WARNING"):
        assert resolve(explicit, SIM_MODEL).model.max_model_len == 100  # asked for: kept, with a warning
    assert "max_model_len=100 does not fit the cache" in caplog.text and "--max-model-len 64 or less" in caplog.text
