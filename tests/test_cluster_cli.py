"""`aptserve serve`'s cluster flags: one replica (the default) is today's single process and never imports Ray;
more need the `cluster` extra and say so in one line without it; vLLM's --data-parallel-size is an alias."""
from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx
import pytest

from aptserve.cli import build_parser
from aptserve.cluster.args import ClusterArgs
from tests.test_engine_process import free_port
from tests.test_server import wait_until


def test_one_replica_serves_without_importing_ray(tmp_path):
    port = free_port()
    # -X importtime logs every module the process imports, including those imported while serving a request.
    command = [sys.executable, "-X", "importtime", "-m", "aptserve.cli", "serve", "--model", "default", "--port",
               str(port), "--kv-cache-memory", "64M", "--disable-uvicorn-access-log"]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:  # a file, not a pipe: nobody reads while it serves
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    base_url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base_url}/health", timeout=2).status_code == 200 or proc.poll() is not None
        except httpx.TransportError:
            return proc.poll() is not None

    try:
        wait_until(up, 300, "the server to start")
        answer = httpx.post(f"{base_url}/v1/completions", timeout=60,
                            json={"model": "default", "prompt": "The capital of France is", "max_tokens": 3,
                                  "temperature": 0})
        assert answer.status_code == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    imported = re.findall(r"^import time:.*\|\s*(\S+)$", log, re.MULTILINE)
    assert "aptserve.server.routes" in imported and "aptserve.cluster.args" in imported
    assert not [m for m in imported if m == "ray" or m.startswith("ray.")]
    assert proc.returncode == 0


def test_replicas_without_ray_name_the_extra():
    code = ("import sys; sys.modules['ray'] = None  # as if the cluster extra were not installed\n"
            "from aptserve.cli import main\n"
            "sys.exit(main(['serve', '--model', 'default', '--replicas', '2']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "--replicas 2 needs Ray Serve" in message and "aptserve[cluster]" in message


def test_data_parallel_size_is_an_alias_and_bad_combinations_are_refused():
    parser = build_parser()
    assert ClusterArgs.from_cli_args(parser.parse_args(["serve", "--data-parallel-size", "3"])).replicas == 3
    assert ClusterArgs.from_cli_args(parser.parse_args(["serve"])).replicas == 1
    with pytest.raises(ValueError, match="--shed needs --router apt-slo"):
        ClusterArgs.from_cli_args(parser.parse_args(["serve", "--replicas", "2", "--router", "pow2", "--shed"]))
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        ClusterArgs.from_cli_args(parser.parse_args(["serve", "--replicas", "0"]))
