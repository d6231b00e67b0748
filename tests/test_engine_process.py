"""`aptserve serve` as users run it: the engine core in a process of its own behind the HTTP front end, on the
real default model; a core that dies fails the open streams, turns /health away and ends the server non-zero."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.test_server import wait_until

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_core_pid(server_pid: int) -> int:
    """The spawned engine-core process among the server's children (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            return int(pid)
    raise AssertionError(f"no engine-core process among {children}")


@contextlib.contextmanager
def serving(*flags: str):
    """`aptserve serve` on the default model in a process: (base url, process)."""
    port = free_port()
    command = [sys.executable, "-m", "aptserve.cli", "serve", "--model", "default", "--port", str(port),
               "--kv-cache-memory", "64M", "--disable-uvicorn-access-log", *flags]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(base_url) or proc.poll() is not None, 300, "the server to start")
        assert proc.poll() is None, proc.stdout.read()
        yield base_url, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def served():
    with serving() as (base_url, proc):
        yield base_url, proc


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_served_by_a_separate_engine_process_with_step_accounting(served):
    base_url, proc = served
    assert engine_core_pid(proc.pid) != proc.pid
    body = {"model": "default", "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}
    answer = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["text"].startswith(" Paris") and answer["usage"]["completion_tokens"] == 3
    metrics = httpx.get(f"{base_url}/metrics", timeout=10).text
    forward_count = next(line for line in metrics.splitlines()
                         if line.startswith('aptserve:step_phase_seconds_count{phase="forward"}'))
    assert float(forward_count.split()[-1]) >= 3  # one prefill step and two decode steps at least
    threads = next(line for line in metrics.splitlines() if line.startswith("aptserve:step_cpu_threads "))
    assert 1 <= float(threads.split()[-1]) <= os.cpu_count()


def test_engine_death_fails_open_streams_and_ends_the_server(served):
    base_url, proc = served
    events: list[str] = []
    first = threading.Event()

    def read_stream() -> None:
        body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    first.set()

    reader = threading.Thread(target=read_stream)
    reader.start()
    assert first.wait(60)
    subprocess.run(["kill", "-9", str(engine_core_pid(proc.pid))], check=True)
    reader.join(30)
    assert not reader.is_alive(), "the client was left hanging"
    assert events[-1] == "[DONE]" and "exited" in json.loads(events[-2])["error"]["message"]
    assert proc.wait(30) == 1
    assert not _healthy(base_url)


def test_an_engine_that_cannot_start_is_a_clear_error():
    command = [sys.executable, "-m", "aptserve.cli", "serve", "--model", "default", "--kv-cache-memory", "1000",
               "--port", str(free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "kv_cache_memory=1000 bytes holds no KV block" in result.stderr


def test_sigterm_stops_the_engine_process_and_exits_cleanly(served):
    base_url, proc = served
    core_pid = engine_core_pid(proc.pid)
    body = {"model": "default", "prompt": "Hi", "max_tokens": 2}
    assert httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).status_code == 200
    proc.terminate()
    assert proc.wait(30) == 0
    assert not Path(f"/proc/{core_pid}").exists() or "zombie" in Path(f"/proc/{core_pid}/status").read_text()


def test_a_drain_that_runs_out_of_time_ends_streams_cleanly_and_says_so():
    with serving("--shutdown-timeout", "2") as (base_url, proc):
        events, first_events = [], threading.Event()

        def read() -> None:
            body = {"model": "default", "prompt": "Count:", "max_tokens": 1000, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                        if len(events) == 3:
                            first_events.set()

        readers = [threading.Thread(target=read) for _ in range(2)]
        for reader in readers:
            reader.start()
        assert first_events.wait(120)
        proc.terminate()
        for reader in readers:
            reader.join(60)
        assert proc.wait(60) == 3  # requests were cut
        output = proc.stdout.read()
        assert "cut 2 unfinished requests" in output and "Traceback" not in output, output
    assert events.count("[DONE]") == 2
    errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
    assert [e["code"] for e in errors] == ["server_shutting_down"] * 2
