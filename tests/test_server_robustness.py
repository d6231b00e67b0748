"""The server under abuse: fuzzed requests, a burst far above capacity, failing batches, a broken step,
clients that vanish, SIGTERM. These run on the simulator's cost-model executor (no model weights: output
text does not matter here, only that the server stays up, answers clearly and leaks no cache unit),
with the real SmolLM2 tokenizer so text prompts and the chat template work."""
from __future__ import annotations

import asyncio
import functools
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from aptserve.config import ModelConfig
from aptserve.core.engine_core import build_engine_core
from aptserve.engine import LLMEngine
from aptserve.registry import load_tokenizer, resolve_model
from aptserve.sim.executor import CostModelExecutor
from tests.sim_fixtures import sim_args
from tests.test_server import running_server, wait_until

SIM = "sim"
POISON_TOKEN_ID = 49_000  # a batch holding this token fails in the executor
SIM_MODEL = ModelConfig(path=SIM, architecture="llama", num_layers=2, hidden_size=64, num_heads=4,
                        num_kv_heads=4, head_dim=16, vocab_size=49_152, max_model_len=128,
                        eos_token_ids=(2,), served_name=SIM)


class SleepyExecutor(CostModelExecutor):
    """The cost-model executor (no clock: real time), where each batch takes `step_s` of wall time so that
    bursts really queue, and a batch holding POISON_TOKEN_ID raises like a failing forward pass."""

    def __init__(self, token_id: int, step_s: float) -> None:
        super().__init__(clock=None, token_id=token_id)
        self.step_s = step_s

    def execute(self, sched_out):
        if sched_out.scheduled:
            time.sleep(self.step_s)
            if any(POISON_TOKEN_ID in r.token_ids for r in sched_out.scheduled):
                raise RuntimeError("poisoned batch")
        return super().execute(sched_out)


@functools.cache
def sim_tokenizer():
    return load_tokenizer(resolve_model("default"))


def sim_engine(num_units: int = 64, max_num_seqs: int = 4, step_s: float = 0.0) -> LLMEngine:
    tokenizer = sim_tokenizer()
    token_id = tokenizer.encode(" ok", add_special_tokens=False)[0]  # visible text, never EOS
    args = sim_args(SIM_MODEL, num_units, block_size=16, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=SIM_MODEL.max_model_len)
    core = build_engine_core(args, model_config=SIM_MODEL, make_executor=lambda _: SleepyExecutor(token_id, step_s))
    return LLMEngine(core, tokenizer=tokenizer)


def completion(**overrides) -> dict:
    return {"model": SIM, "prompt": [5, 6, 7, 8], "max_tokens": 8, **overrides}


# --- names and SLOs ------------------------------------------------------------------------------
def test_served_model_names_and_per_request_slos_reach_the_engine():
    engine = sim_engine(step_s=0.01)
    with running_server(engine, served_model_name=("alias", "other")) as live:
        client = live.client()
        assert [m.id for m in client.models.list().data] == ["alias"]
        for name in ("alias", "other", SIM):  # the served names and the engine's own model name
            assert client.completions.create(model=name, prompt=[5], max_tokens=1).model == "alias"
        stream = client.completions.create(model="other", prompt=[5, 6], max_tokens=50, stream=True,
                                           extra_body={"ttft_slo": 0.25})
        request = engine.scheduler.requests[next(iter(stream)).id]
        assert (request.ttft_slo_s, request.tbt_slo_s) == (0.25, engine.config.scheduler.tbt_slo_s)
        stream.close()
        live.wait_idle()


# --- fuzzing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_server_error_and_no_undocumented_response(mode):
    with running_server(sim_engine(num_units=128)) as live:
        schema = schemathesis.openapi.from_url(f"{live.base_url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 7  # health, metrics, models, completions, chat, tokenize, detokenize
        for operation in operations:
            if mode == schemathesis.GenerationMode.POSITIVE or operation.method.upper() == "POST":
                _fuzz(operation.as_strategy(generation_mode=mode), live.base_url)
        live.wait_idle()
        assert httpx.get(f"{live.base_url}/health").status_code == 200


def _fuzz(strategy, base_url: str) -> None:
    @settings(max_examples=15, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data):
        checks = [not_a_server_error, content_type_conformance, response_schema_conformance]
        data.draw(strategy).call_and_validate(base_url=base_url, checks=checks, timeout=30)

    check()


# --- overload ------------------------------------------------------------------------------------
def test_burst_far_above_capacity_gets_clear_503s_and_leaks_nothing():
    num_requests, max_queue_len = 200, 16
    with running_server(sim_engine(num_units=64, max_num_seqs=4, step_s=0.005),
                        max_queue_len=max_queue_len) as live:
        responses = asyncio.run(_burst(live.base_url, num_requests))
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 503]
        assert len(ok) + len(refused) == num_requests
        assert len(ok) >= max_queue_len and refused, (len(ok), len(refused))
        assert all(r.json()["usage"]["completion_tokens"] == 8 for r in ok)
        assert {r.json()["error"]["code"] for r in refused} == {"server_overloaded"}
        assert "--max-queue-len" in refused[0].json()["error"]["message"]
        live.wait_idle()
        assert httpx.get(f"{live.base_url}/health").status_code == 200
        assert live.metric("aptserve:request_rejected_total") == len(refused)
        assert live.metric("aptserve:request_success_total", finished_reason="length") == len(ok)


def test_n_beyond_the_queue_is_a_400_and_a_refusal_leaves_no_trace():
    with running_server(sim_engine(num_units=128, max_num_seqs=4, step_s=0.005), max_queue_len=8) as live:
        never = httpx.post(f"{live.base_url}/v1/completions", json=completion(n=9), timeout=30)
        assert never.status_code == 400, never.text
        assert "at most 8 (--max-queue-len); lower n" in never.json()["error"]["message"]
        alone = httpx.post(f"{live.base_url}/v1/completions", json=completion(n=8), timeout=30)  # at once after it
        assert alone.status_code == 200, alone.text
        assert len(alone.json()["choices"]) == 8
        live.wait_idle()


def test_a_client_within_the_queue_length_never_gets_a_503_even_when_it_gives_up_on_requests():
    """Concurrency = --max-queue-len, one request running at a time (so the queue is nearly full all along), and
    every third request abandoned by its client while it waits, then sent again at once: the abandoned one must
    not count until the core hears of it, nor a finished one until the core's next step."""
    num_clients, num_requests = 8, 240
    with running_server(sim_engine(num_units=128, max_num_seqs=1, step_s=0.005), max_queue_len=num_clients) as live:
        async def run() -> list[int | str]:
            statuses: list[int | str] = []
            left = iter(range(num_requests))
            async with httpx.AsyncClient(base_url=live.base_url, timeout=60) as client:
                async def one_client() -> None:
                    for index in left:
                        timeout = 0.01 if index % 3 == 0 else 60  # gives up while it waits
                        try:
                            response = await client.post("/v1/completions", json=completion(max_tokens=2),
                                                         timeout=timeout)
                            statuses.append(response.status_code)
                        except httpx.TimeoutException:
                            statuses.append("gave up")
                await asyncio.gather(*(one_client() for _ in range(num_clients)))
            return statuses

        statuses = asyncio.run(run())
        assert 503 not in statuses and len(statuses) == num_requests, statuses
        assert statuses.count(200) >= num_requests // 2 and "gave up" in statuses
        live.wait_idle()
        assert live.metric("aptserve:request_rejected_total") == 0


async def _burst(base_url: str, num_requests: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=num_requests)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=completion())
                                      for _ in range(num_requests)))


# --- failures inside the engine ------------------------------------------------------------------
def test_failing_batch_is_reported_to_its_client_and_the_server_goes_on():
    with running_server(sim_engine()) as live:
        client = live.client()
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=SIM, prompt=[5, POISON_TOKEN_ID], max_tokens=4)
        assert info.value.code == "request_failed" and "poisoned batch" in info.value.message
        with pytest.raises(openai.APIError, match="poisoned batch"):
            list(client.completions.create(model=SIM, prompt=[POISON_TOKEN_ID], max_tokens=4, stream=True))
        assert client.completions.create(model=SIM, prompt=[5, 6], max_tokens=4).usage.completion_tokens == 4
        live.wait_idle()
        assert live.metric("aptserve:request_success_total", finished_reason="error") == 2


def test_engine_loop_survives_a_step_that_raises(monkeypatch):
    engine = sim_engine(step_s=0.01)
    schedule = engine.scheduler.schedule
    num_failures = [1]

    def flaky_schedule(now):
        if num_failures[0] and engine.scheduler.num_waiting:
            num_failures[0] -= 1
            raise RuntimeError("scheduler bug")
        return schedule(now)

    monkeypatch.setattr(engine.scheduler, "schedule", flaky_schedule)
    with running_server(engine) as live:
        response = httpx.post(f"{live.base_url}/v1/completions", json=completion(), timeout=30)
        assert response.status_code == 500 and "scheduler bug" in response.json()["error"]["message"]
        assert httpx.post(f"{live.base_url}/v1/completions", json=completion(), timeout=30).status_code == 200
        live.wait_idle()
        assert httpx.get(f"{live.base_url}/health").status_code == 200


# --- clients that go away ------------------------------------------------------------------------
def test_client_gone_before_a_non_streaming_answer_aborts_the_request():
    with running_server(sim_engine(step_s=0.05)) as live:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.base_url}/v1/completions", json=completion(max_tokens=100), timeout=0.3)
        live.wait_idle(timeout_s=3)  # 100 tokens take >= 5 s: only an abort ends the request this soon
        assert live.metric("aptserve:request_success_total", finished_reason="abort") == 1


# --- SIGTERM -------------------------------------------------------------------------------------
def test_drain_gives_up_on_requests_after_the_shutdown_timeout():
    with running_server(sim_engine(step_s=0.05), shutdown_timeout_s=0.2) as live:
        stream = live.client().completions.create(model=SIM, prompt=[5], max_tokens=100, stream=True)
        events = [next(iter(stream))]
        live.server.handle_exit(signal.SIGTERM, None)
        live.thread.join(4)  # the request alone needs >= 5 s (100 steps of 50 ms)
        assert not live.thread.is_alive(), "the server waited past its shutdown timeout"
        with pytest.raises(openai.APIError, match="shut down before this request finished"):
            events.extend(stream)  # the cut stream ends with an error event (then [DONE]), not a broken body
        assert len(events) < 100 and live.server.num_cut == 1
        live.wait_idle(timeout_s=1)  # the engine thread aborted what was left before exiting


# A sim server in a process of its own; it imports only aptserve (the test module's imports take seconds).
SERVE_SCRIPT = """
import socket, sys, time
from aptserve.config import ModelConfig
from aptserve.core.engine_core import build_engine_core
from aptserve.engine_args import EngineArgs
from aptserve.server import AsyncLLM, ServerArgs, build_server, create_app
from aptserve.sim.executor import CostModelExecutor

class SleepyExecutor(CostModelExecutor):
    def execute(self, sched_out):
        time.sleep(0.02)
        return super().execute(sched_out)

model = ModelConfig(path="sim", architecture="llama", num_layers=2, hidden_size=64, num_heads=4,
                    num_kv_heads=4, head_dim=16, vocab_size=49152, max_model_len=128, served_name="sim")
args = EngineArgs(model="sim", block_size=16, kv_cache_memory=64 * 2 * 16 * 64 * 4, hybrid_cache="off")
core = build_engine_core(args, model_config=model, make_executor=lambda _: SleepyExecutor(token_id=1111))
sock = socket.socket(fileno=int(sys.argv[1]))
app = create_app(AsyncLLM.in_thread(core, None, ServerArgs()))
build_server(app, shutdown_timeout_s=20, log_level="warning").run(sockets=[sock])
"""


def test_sigterm_drains_in_flight_requests_then_exits_cleanly():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(sock.fileno())],
                            pass_fds=[sock.fileno()], cwd=Path(__file__).parents[1], stderr=subprocess.PIPE,
                            text=True)
    sock.close()
    try:
        wait_until(lambda: _healthy(base_url) or proc.poll() is not None, 120, "the server process to start")
        events, first_event = [], threading.Event()
        reader = threading.Thread(target=_read_stream, args=(base_url, events, first_event))
        reader.start()
        assert first_event.wait(30)
        proc.send_signal(signal.SIGTERM)
        refused = httpx.post(f"{base_url}/v1/completions", json=completion(), timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
        assert httpx.get(f"{base_url}/health", timeout=10).status_code == 503
        reader.join(30)
        assert events[-1] == "[DONE]" and len(events) == 60 + 1  # every token of the in-flight request
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _read_stream(base_url: str, events: list[str], first_event: threading.Event) -> None:
    body = completion(max_tokens=60, stream=True)
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                first_event.set()
