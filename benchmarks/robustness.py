"""Robustness probes against `aptserve serve` on the default model, each while a bystander stream runs.

For every probe: what the server answered, how long it took, the cache units still held once everything settled
(leaks), and the largest gap between the bystander's events (a probe must not stall other clients). The last
probe drains the server with SIGTERM while long streams run past --shutdown-timeout.

    .venv/bin/python benchmarks/robustness.py        # ~3 min; writes benchmarks/results/robustness.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from aptserve.bench.bystander import BystanderProcess  # noqa: E402
from benchmarks.common import RESULTS_DIR, write_json  # noqa: E402
from benchmarks.servers import scrape, wait_ready  # noqa: E402

MODEL = "default"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8133)
    parser.add_argument("--kv-cache-memory", default="256M")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only the probes whose names contain one of these strings (and no drain)")
    parser.add_argument("--bystander-tbt-slo", type=float, default=0.5,
                        help="the TBT SLO (s) the bystander asks for; the server plans its steps within it")
    parser.add_argument("--client-nice", type=int, default=0,
                        help="run each probe's client at this niceness (19: the server's processes get the CPU "
                             "first, as with a client on another machine); the JSON's name says it when not 0")
    parser.add_argument("--server-args", default="", help="more `aptserve serve` flags, as one string (A/Bs)")
    parser.add_argument("--name", default=None, help="file name of the results (default: robustness, with "
                        "_client_nice<N> when --client-nice is set)")
    return parser.parse_args(argv)


def body(**fields) -> dict:
    return {"model": MODEL, "prompt": "Tell me a long story about the sea.", "max_tokens": 8, **fields}


def post(url: str, payload, **kwargs) -> str:
    kwargs = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    response = httpx.post(f"{url}/v1/completions", timeout=300, headers={"content-type": "application/json"},
                          **kwargs)
    return f"{response.status_code} {response.text[:140]}"


def junk_fields(url: str) -> str:
    return post(url, json.dumps({**body(), **{f"x{i}": "y" * 1000 for i in range(20_000)}}).encode())


def huge_prompt(num_bytes: int):
    return lambda url: post(url, json.dumps(body(prompt="word " * (num_bytes // 5))).encode())


def many_stop_strings(url: str) -> str:
    stops = [f"{i:04d}" + "z" * 3000 for i in range(1000)]
    return post(url, body(stop=stops))


def max_stop_strings_streams(url: str) -> str:
    """What the limits still allow: 4 streams of 300 tokens with 16 stop strings of 256 characters."""
    stops = [f"{i:02d}" + "z" * 254 for i in range(16)]

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body(
                stop=stops, max_tokens=300, ignore_eos=True)) for _ in range(4)))

    return " ".join(str(r.status_code) for r in asyncio.run(run()))


def idle_connections(num: int):
    def probe(url: str) -> str:
        host, port = url.removeprefix("http://").split(":")
        sockets = [socket.create_connection((host, int(port))) for _ in range(num)]
        answered = post(url, body())
        time.sleep(11)  # past the header-read timeout: the server closes them
        closed = 0
        for sock in sockets:
            sock.settimeout(1)
            try:
                closed += sock.recv(16) == b""
            except OSError:
                closed += 1
            sock.close()
        return f"normal request: {answered[:3]}; {closed}/{num} idle connections closed by the server"
    return probe


def disconnects(url: str) -> str:
    """70 streams, each closed by its client after the first events. They share one client, as a program opening
    many streams does: a client each would spend ~25 ms of CPU apiece building TLS contexts on the server's cores."""
    with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=70)) as client:
        def one() -> None:
            with client.stream("POST", f"{url}/v1/completions",
                               json=body(max_tokens=200, stream=True, ignore_eos=True)) as response:
                for _ in zip(range(3), response.iter_lines()):
                    pass

        threads = [threading.Thread(target=one) for _ in range(70)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return "70 streams closed after their first events"


def burst(url: str) -> str:
    async def run():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body()) for _ in range(200)))

    return str(dict(Counter(r.status_code for r in asyncio.run(run()))))


def answer(response: httpx.Response) -> str:
    return f"{response.status_code} {response.text[:140]} ({len(response.content)} bytes)"


def many_messages(path: str):
    """200,000 one-character messages (5.8 MB, under the body limit): the chat template must not render them on
    the event loop."""
    messages = [{"role": "user", "content": "a"}] * 200_000
    return lambda url: answer(httpx.post(f"{url}{path}", json={"model": MODEL, "messages": messages}, timeout=300))


def detokenize_ids(url: str) -> str:
    return answer(httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": [100] * 1_000_000}, timeout=300))


def echo_logprobs(url: str) -> str:
    """A 1,001-token prompt scored (echo + 20 alternatives per token) for each of 4 choices."""
    prompt = [1] + [100 + i % 1000 for i in range(1000)]
    response = httpx.post(f"{url}/v1/completions", timeout=300, json=body(
        prompt=prompt, echo=True, logprobs=20, n=4, max_tokens=1))
    if response.status_code != 200:
        return answer(response)
    scored = [len(c["logprobs"]["tokens"]) for c in response.json()["choices"]]
    return f"200, tokens with logprobs per choice {scored} ({len(response.content)} bytes)"


def n_beyond_queue(url: str) -> str:
    """n: 64 against --max-queue-len 32 (can never fit), then n: 32 at once (fits when alone)."""
    return f"n 64: {post(url, body(n=64))[:120]} | then n 32: {post(url, body(n=32))[:3]}"


def soak(num_requests: int, concurrency: int):
    """`concurrency` clients, each sending its next request when the last one is answered: never more in flight
    than the queue holds, so no 503 is honest."""
    def probe(url: str) -> str:
        async def run():
            counts: Counter = Counter()
            left = iter(range(num_requests))
            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
                async def client_loop():
                    for _ in left:
                        try:
                            counts[(await client.post(f"{url}/v1/completions", json=body())).status_code] += 1
                        except httpx.TransportError as exc:  # counted, not hidden: the JSON shows them
                            counts[type(exc).__name__] += 1
                await asyncio.gather(*(client_loop() for _ in range(concurrency)))
            return counts
        return str(dict(asyncio.run(run())))
    return probe


def structured(constraint: dict, **fields):
    """A completion under a structured-output constraint (vLLM's `structured_outputs`)."""
    return lambda url: post(url, body(structured_outputs=constraint, **fields))


CHOICES_5000 = [str(i) for i in range(5000)]


PROBES = {
    "top_k 2**63 (overflows the sampler)": lambda url: post(url, body(top_k=2**63, temperature=1)),
    "max_tokens '16' (a string)": lambda url: post(url, body(max_tokens="16")),
    "temperature 1e-308": lambda url: post(url, body(temperature=1e-308)),
    "top_p 1e-300": lambda url: post(url, body(top_p=1e-300, temperature=1)),
    "user message without content": lambda url: httpx.post(
        f"{url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user"}]}, timeout=60).text[:140],
    "20 MB of junk fields": junk_fields,
    "10 MB prompt": huge_prompt(10 << 20),
    "2 MB prompt": huge_prompt(2 << 20),
    "1,000 stop strings of 3,000 characters": many_stop_strings,
    "4 streams x 16 stop strings of 256 characters": max_stop_strings_streams,
    "2,000 idle connections": idle_connections(2000),
    "70 disconnects mid-stream": disconnects,
    "burst of 200 against --max-queue-len 32": burst,
    # The first structured request after start must not build the grammar tokenizer inside a step (run first).
    "first structured-output request after start (regex [ab]+)": structured({"regex": "[ab]+"}),
    "50 KB regex ((a|aa)* x 7142 + b)": structured({"regex": "(a|aa)*" * 7142 + "b"}),
    "choice with 5,000 options": structured({"choice": CHOICES_5000}),
    "choice with 5,000 options, n 32": structured({"choice": CHOICES_5000}, n=32),
    "Lark grammar start: a / a: a": structured({"grammar": "start: a\na: a"}),
    "chat with 200,000 one-character messages": many_messages("/v1/chat/completions"),
    "/tokenize with 200,000 one-character messages": many_messages("/tokenize"),
    "/detokenize with 1,000,000 ids": detokenize_ids,
    "echo + logprobs 20 on a 1,001-token prompt, n 4": echo_logprobs,
    "n 64 against --max-queue-len 32, then n 32": n_beyond_queue,
    "soak: 2,000 requests at concurrency 32 against --max-queue-len 32": soak(2000, 32),
}


def units_held(url: str) -> float:
    return sum(value for (name, _), value in scrape(url).items() if name == "aptserve:cache_units_used")


def settle(url: str, timeout_s: float = 60) -> float:
    """Cache units still held once no request runs or waits (0 unless something leaked)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = scrape(url)
        busy = sum(v for (name, _), v in metrics.items()
                   if name in ("aptserve:num_requests_running", "aptserve:num_requests_waiting"))
        if busy == 0:
            break
        time.sleep(0.5)
    return units_held(url)


def drain(url: str, process) -> dict:
    """10 streams of 1,500 tokens, SIGTERM after 3 s, --shutdown-timeout 10: every stream must end cleanly."""
    endings: list[list[str]] = []

    def read() -> None:
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=300,
                          json=body(max_tokens=1500, stream=True, ignore_eos=True)) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
        endings.append(events[-2:])

    readers = [threading.Thread(target=read) for _ in range(10)]
    for reader in readers:
        reader.start()
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    for reader in readers:
        reader.join(120)
    clean = sum(1 for end in endings if len(end) == 2 and end[1] == "[DONE]" and '"server_shutting_down"' in end[0])
    return {"probe": "SIGTERM with 10 streams of 1,500 tokens, --shutdown-timeout 10",
            "result": f"{clean}/10 streams ended with an error event and [DONE]; exit status {process.wait(60)}"}


def run_probe(probe, url: str, nice: int) -> str:
    """The probe's answer; with `nice`, from a forked child at that niceness."""
    if not nice:
        return probe(url)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.nice(nice)
        try:
            result = probe(url)
        except Exception as exc:
            result = f"client error: {type(exc).__name__}: {exc}"
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(result.encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        result = pipe.read().decode()
    os.waitpid(pid, 0)
    return result


def main(argv: list[str] | None = None) -> int:
    import subprocess

    args = parse_args(argv)
    url = f"http://127.0.0.1:{args.port}"
    log_path = Path(tempfile.mkdtemp(prefix="robustness-")) / "server.log"
    command = [sys.executable, "-m", "aptserve.cli", "serve", "--model", MODEL, "--port", str(args.port),
               "--kv-cache-memory", args.kv_cache_memory, "--max-queue-len", "32", "--max-num-seqs", "32",
               "--shutdown-timeout", "10", "--disable-uvicorn-access-log", *shlex.split(args.server_args)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    rows = []
    try:
        wait_ready(process, url, 600, log_path)
        for name, probe in PROBES.items():
            if args.only and not any(part in name for part in args.only):
                continue
            bystander = BystanderProcess(url, body(max_tokens=150, ignore_eos=True, tbt_slo=args.bystander_tbt_slo))
            bystander.start()
            bystander.started.wait(60)
            start = time.perf_counter()
            result = run_probe(probe, url, args.client_nice)
            seconds = time.perf_counter() - start
            bystander.join(300)
            rows.append({"probe": name, "result": result, "seconds": round(seconds, 2),
                         "units_leaked": settle(url), "bystander_largest_gap_s": round(bystander.largest_gap_s, 3),
                         "bystander_events": bystander.num_events})
            print(json.dumps(rows[-1]), flush=True)
        if not args.only:
            rows.append(drain(url, process))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        process.kill()
        process.wait()
    log_text = log_path.read_text(errors="replace")
    summary = {"tracebacks_in_log": log_text.count("Traceback"), "log_lines": log_text.count("\n")}
    name = args.name or (f"robustness_client_nice{args.client_nice}" if args.client_nice else "robustness")
    path = write_json(Path(args.out_dir) / f"{name}.json",
                      {"benchmark": "robustness", "command": command, "bystander_tbt_slo_s": args.bystander_tbt_slo,
                       "client_nice": args.client_nice, "probes": rows, "log": summary})
    print(f"wrote {path}; log: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
