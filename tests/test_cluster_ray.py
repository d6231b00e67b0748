"""`aptserve serve --replicas 2 --shed` as users run it: a local Ray cluster, two replicas of the default model
behind the apt-slo router, the same OpenAI API on one port. One cluster serves the module (started and stopped by
a fixture); each test leaves it as it found it (no request open, every cache unit free)."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from aptserve.cluster.args import ClusterArgs
from tests.test_engine_process import free_port
from tests.test_server import wait_until

pytest.importorskip("ray.serve", reason="the cluster extra (ray[serve]) is not installed")
pytestmark = pytest.mark.cluster  # `make test` runs these after the parallel run, on an otherwise idle machine

MAX_NUM_SEQS, MAX_QUEUE_LEN = 2, 1  # small, so that a handful of requests fills the cluster
ROUTING_STATS_PERIOD_S = ClusterArgs.routing_stats_period_s  # how often the router polls each replica
LONG = {"model": "default", "prompt": "Count from one to one thousand:", "max_tokens": 400, "temperature": 0,
        "ignore_eos": True}


def metric_samples(base_url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{labels: value} of one metric family on /metrics."""
    samples = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(?:{{(.*)}})? (\S+)", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(1) or "")))
            samples[labels] = float(match.group(2))
    return samples


def per_replica(base_url: str, name: str) -> dict[str, float]:
    return {dict(labels)["replica"]: value for labels, value in metric_samples(base_url, name).items()}


def replica_pids(base_url: str) -> dict[str, int]:
    return {dict(labels)["replica"]: int(dict(labels)["pid"])
            for labels in metric_samples(base_url, "aptserve:replica_info")}


def units_in_use(base_url: str) -> float:
    return sum(metric_samples(base_url, "aptserve:cache_units_used").values())


def healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def settled(base_url: str) -> bool:
    """Two replicas reporting, nothing running, waiting or held."""
    running = per_replica(base_url, "aptserve:replica_num_requests_running")
    waiting = per_replica(base_url, "aptserve:replica_num_requests_waiting")
    return (len(replica_pids(base_url)) == 2 and not any(running.values()) and not any(waiting.values())
            and units_in_use(base_url) == 0)


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    command = [sys.executable, "-m", "aptserve.cli", "serve", "--model", "default", "--port", str(port),
               "--replicas", "2", "--kv-cache-memory", "64M", "--max-num-seqs", str(MAX_NUM_SEQS),
               "--max-queue-len", str(MAX_QUEUE_LEN), "--shed", "--disable-uvicorn-access-log"]
    log = open(f"/tmp/aptserve-cluster-test-{port}.log", "w+")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: healthy(base_url) or proc.poll() is not None, 300, "the cluster to start")
        assert proc.poll() is None, open(log.name).read()[-4000:]
        wait_until(lambda: len(replica_pids(base_url)) == 2, 30, "both replicas to report")
        yield base_url
    finally:
        proc.send_signal(signal.SIGTERM)  # a clean stop: drain, then Serve and the local Ray go down with it
        try:
            assert proc.wait(60) == 0, open(log.name).read()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


@pytest.fixture
def idle_cluster(cluster):
    wait_until(lambda: settled(cluster), 30, "the cluster to be idle")
    yield cluster
    wait_until(lambda: settled(cluster), 60, "every request to end and every cache unit to be free")


def test_the_openai_client_streams_through_the_cluster(idle_cluster):
    client = openai.OpenAI(base_url=f"{idle_cluster}/v1", api_key="none", max_retries=0, timeout=60)
    chunks = list(client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi!"}],
                                                 max_tokens=12, temperature=0, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert len(chunks) >= 2 and text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    answer = client.completions.create(model="default", prompt="The capital of France is", max_tokens=3,
                                       temperature=0)
    assert answer.choices[0].text.startswith(" Paris") and answer.usage.completion_tokens == 3
    echoed = [e.choices[0] for e in client.completions.create(model="default", prompt="The capital of France is",
                                                             max_tokens=3, temperature=0, echo=True, logprobs=1,
                                                             stream=True) if e.choices]
    assert "".join(c.text for c in echoed) == "The capital of France is" + answer.choices[0].text
    assert echoed[0].logprobs.token_logprobs[0] is None and len(echoed[0].logprobs.tokens) > 3  # the prompt's, first
    # One code path with the single-node server: its checks answer here too.
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="default", prompt="hi", max_tokens=0)


def test_routing_follows_the_replicas_reports(idle_cluster):
    """A replica busy with a long request (as its reports show) gets none of the short ones sent meanwhile."""
    client = openai.OpenAI(base_url=f"{idle_cluster}/v1", api_key="none", max_retries=0, timeout=120)
    before = per_replica(idle_cluster, "aptserve:replica_requests_routed_total")
    long_stream = client.completions.create(**{k: v for k, v in LONG.items() if k != "ignore_eos"}, stream=True,
                                            extra_body={"ignore_eos": True})
    next(iter(long_stream))  # the long request runs
    wait_until(lambda: any(per_replica(idle_cluster, "aptserve:replica_num_requests_running").values()), 10,
               "a replica to report the long request")
    busy = next(r for r, n in per_replica(idle_cluster, "aptserve:replica_num_requests_running").items() if n)
    for _ in range(4):
        client.completions.create(model="default", prompt="Hello", max_tokens=2, temperature=0)
        # The next one is routed on a report taken after this one finished: the router holds a request it sent as
        # booked until a report shows it, and a report taken before it started would pass the wait below at once.
        time.sleep(2 * ROUTING_STATS_PERIOD_S)
        wait_until(lambda: sum(per_replica(idle_cluster, "aptserve:replica_num_requests_running").values()) == 1, 10,
                   "the replicas to report the short request finished")
    after = per_replica(idle_cluster, "aptserve:replica_requests_routed_total")
    routed = {replica: after.get(replica, 0) - before.get(replica, 0) for replica in after}
    assert routed[busy] == 1 and sum(routed.values()) == 5, routed
    long_stream.close()


def test_an_aborted_stream_frees_every_cache_unit_on_its_replica(idle_cluster):
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{idle_cluster}/v1/completions", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            wait_until(lambda: units_in_use(idle_cluster) > 0, 10, "the replica to report the request's units")
        # The connection closed mid-stream: the front end cancels the replica's stream, which aborts the request.
    wait_until(lambda: settled(idle_cluster), 30, "the aborted request's units to come back")


def test_a_full_cluster_answers_503_and_serves_the_rest(idle_cluster):
    """Past each replica's batch and queue and the router's own queue, requests get 503 at once; the others
    finish; nothing hangs."""
    statuses: list[int] = []

    def send() -> None:
        response = httpx.post(f"{idle_cluster}/v1/completions", json={**LONG, "max_tokens": 40}, timeout=120)
        statuses.append(response.status_code)
        if response.status_code == 503:
            assert response.json()["error"]["code"] in ("server_overloaded", "request_shed")
            assert response.headers["retry-after"] == "1"

    capacity = 2 * (MAX_NUM_SEQS + MAX_QUEUE_LEN) + MAX_QUEUE_LEN  # both replicas, then the router's queue
    threads = [threading.Thread(target=send) for _ in range(2 * capacity)]
    for thread in threads:
        thread.start()
        time.sleep(0.02)
    for thread in threads:
        thread.join(120)
    assert len(statuses) == len(threads)
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses  # --shed may refuse most of a burst
    assert set(statuses) <= {200, 503}, statuses


def test_the_router_sheds_what_no_replica_can_serve_in_time(idle_cluster):
    body = {"model": "default", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    refused = httpx.post(f"{idle_cluster}/v1/completions", json={**body, "ttft_slo": 1e-4}, timeout=60)
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "request_shed" and "no replica can meet the request's SLOs" in error["message"]
    assert httpx.post(f"{idle_cluster}/v1/completions", json=body, timeout=60).status_code == 200
    rejected = metric_samples(idle_cluster, "aptserve:request_rejected_total")
    assert rejected[(("reason", "request_shed"),)] >= 1


def test_a_killed_replica_fails_its_requests_and_is_replaced(idle_cluster):
    pids = replica_pids(idle_cluster)
    events: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{idle_cluster}/v1/completions", json={**LONG, "stream": True},
                          timeout=60) as response:
            events.extend(line for line in response.iter_lines() if line.startswith("data:"))

    reader = threading.Thread(target=stream)
    reader.start()
    wait_until(lambda: any(per_replica(idle_cluster, "aptserve:replica_num_requests_running").values()), 20,
               "a replica to report the request")
    busy = next(r for r, n in per_replica(idle_cluster, "aptserve:replica_num_requests_running").items() if n)
    subprocess.run(["kill", "-9", str(pids[busy])], check=True)
    reader.join(60)
    assert not reader.is_alive(), "the stream of a killed replica hung"
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["code"] == "request_failed" and "replica" in error["message"]
    wait_until(lambda: len(replica_pids(idle_cluster)) == 2 and busy not in replica_pids(idle_cluster), 120,
               "Serve to replace the killed replica")
    answer = httpx.post(f"{idle_cluster}/v1/completions", timeout=60,
                        json={"model": "default", "prompt": "The capital of France is", "max_tokens": 3,
                              "temperature": 0})
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"].startswith(" Paris")
    assert healthy(idle_cluster)
