"""Memory over a long soak of `aptserve serve`: the resident memory of the HTTP process and of the engine-core
process after every 1,000 requests, with `concurrency` clients against a queue that holds all their choices (a
request with n = 2 is two: --max-queue-len is 2 x concurrency, so a 503 is never honest), and the answers counted
by status.

The requests vary the way real traffic does, so whatever the server keeps per request, per prompt shape or per
option shows up: prompts of 1-40 words, 1-16 output tokens, streamed or not, completions and chat, greedy and
seeded sampling, logprobs, n = 2, stop strings, a few structured-output constraints, and some clients that hang
up mid-stream. Deterministic (one seed per request).

    .venv/bin/python benchmarks/soak.py                          # 20,000 requests, ~25 min here
    .venv/bin/python benchmarks/soak.py --num-requests 3000     # a quick look

Writes <out-dir>/<name>.json and .png. "Flat" is judged after --warmup requests: the growth per 1,000 requests
of each process by a least-squares line over the later samples.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from benchmarks.common import RESULTS_DIR, save_figure, write_json  # noqa: E402
from benchmarks.servers import SERVED_NAME, aptserve_command, running_server, scrape  # noqa: E402

WORDS = ("the sea ship wind harbour light captain storm night morning island rope sail wave salt gull north "
         "story voyage map star compass anchor deck crew journey shore fog bell lantern tide").split()
REGEXES = ("[ab]+", "(yes|no)", "[0-9]{1,4}", "[a-z]+ [a-z]+")
MAX_N = 2
SETTLE_S = 2.0  # idle time before a settled sample: the engine loop trims its heap when it falls idle


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32, help="clients; the server's --max-queue-len is "
                        f"{MAX_N} x this (a request of n choices counts n)")
    parser.add_argument("--report-every", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=2000, help="requests before memory must be flat")
    parser.add_argument("--kv-cache-memory", default="64M")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--port", type=int, default=8141)
    parser.add_argument("--extra", default="", help="more `aptserve serve` flags, space separated")
    parser.add_argument("--name", default="soak")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def request_for(index: int) -> tuple[str, dict, bool, bool]:
    """(path, body, stream, hang up after the first event) of the index-th request."""
    rng = random.Random(index)
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    sampling = {"max_tokens": rng.randint(1, 16)}
    if rng.random() < 0.5:
        sampling.update(temperature=1.0, top_p=0.9, seed=rng.randrange(1 << 30))
    else:
        sampling.update(temperature=0)
    roll = rng.random()
    if roll < 0.1:
        sampling["logprobs"] = rng.randint(0, 5)
    elif roll < 0.15:
        sampling["n"] = MAX_N
    elif roll < 0.2:
        sampling["stop"] = [rng.choice(WORDS)]
    elif roll < 0.23:
        sampling["structured_outputs"] = {"regex": rng.choice(REGEXES)}
    stream = rng.random() < 0.5
    hang_up = stream and rng.random() < 0.05
    if rng.random() < 0.25:
        sampling.pop("logprobs", None)  # chat's logprobs are a flag; keep the chat bodies plain
        return "/v1/chat/completions", {"model": SERVED_NAME, "messages": [{"role": "user", "content": text}],
                                        "stream": stream, **sampling}, stream, hang_up
    return "/v1/completions", {"model": SERVED_NAME, "prompt": text, "stream": stream, **sampling}, stream, hang_up


async def send(client: httpx.AsyncClient, url: str, index: int) -> str:
    """The request's status code, or 'hung up' / the exception's name where the client ended it."""
    path, body, stream, hang_up = request_for(index)
    try:
        if not stream:
            return str((await client.post(url + path, json=body)).status_code)
        async with client.stream("POST", url + path, json=body) as response:
            async for line in response.aiter_lines():
                if hang_up and line.startswith("data: "):
                    return "hung up"
            return str(response.status_code)
    except httpx.HTTPError as error:
        return type(error).__name__


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def children(pid: int) -> list[int]:
    """Direct children of pid (the engine-core process of `aptserve serve`)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def process_tree() -> dict[str, int]:
    """{'http': the `aptserve serve` process this script started, 'engine_core': that one's child}."""
    servers = children(os.getpid())
    if len(servers) != 1:
        raise RuntimeError(f"expected one server process, found {servers}")
    # multiprocessing's spawned child (the resource tracker is a child too)
    cores = [pid for pid in children(servers[0]) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    if len(cores) != 1:
        raise RuntimeError(f"expected one engine-core process under the server, found {cores}")
    return {"http": servers[0], "engine_core": cores[0]}


async def soak(url: str, pids: dict[str, int], args: argparse.Namespace) -> tuple[list[dict], Counter]:
    """Samples RSS twice per --report-every answers: under load, and settled (the clients held back until nothing
    is in flight, then SETTLE_S for the idle engine to trim its heap): what the processes keep, without the swing of
    where a sample falls between trims."""
    counts: Counter = Counter()
    samples: list[dict] = []
    done = in_flight = 0
    start = time.perf_counter()
    indices = iter(range(args.num_requests))
    sending = asyncio.Event()
    sending.set()

    async def sample() -> None:
        row = {"requests": done, "elapsed_s": round(time.perf_counter() - start, 1),
               **{f"{name}_rss_mb": round(rss_mb(pid), 1) for name, pid in pids.items()}}
        sending.clear()
        while in_flight:
            await asyncio.sleep(0.05)
        await asyncio.sleep(SETTLE_S)
        row.update({f"{name}_settled_rss_mb": round(rss_mb(pid), 1) for name, pid in pids.items()})
        sending.set()
        samples.append(row)
        print(row, dict(counts), flush=True)

    await sample()
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as client:
        async def client_loop() -> None:
            nonlocal done, in_flight
            for index in indices:
                await sending.wait()
                in_flight += 1
                counts[await send(client, url, index)] += 1
                in_flight -= 1
                done += 1
                if done % args.report_every == 0:
                    await sample()
        await asyncio.gather(*(client_loop() for _ in range(args.concurrency)))
    return samples, counts


def growth_per_1000(samples: list[dict], key: str, warmup: int) -> float | None:
    """Least-squares slope of RSS (MB) per 1,000 requests over the samples after `warmup` requests."""
    points = [(s["requests"], s[key]) for s in samples if s["requests"] >= warmup]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in points)
             / sum((x - mean_x) ** 2 for x, _ in points))
    return round(1000 * slope, 2)


def plot(samples: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, label in ((axes[0], "http", "HTTP process"), (axes[1], "engine_core", "engine core")):
        for suffix, line in (("rss_mb", "under load"), ("settled_rss_mb", "settled")):
            axis.plot([s["requests"] for s in samples], [s[f"{key}_{suffix}"] for s in samples], marker="o",
                      label=line)
        axis.set(xlabel="requests answered", ylabel="RSS (MB)", title=label)
        axis.legend()
        axis.grid(alpha=0.3)
    save_figure(figure, path, title)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv_, env = aptserve_command("default", args.kv_cache_memory, args.max_num_seqs, 2048, args.port, threads=2)
    argv_ += ["--max-queue-len", str(MAX_N * args.concurrency), *args.extra.split()]
    log_dir = Path(tempfile.mkdtemp(prefix="soak-"))
    with running_server("aptserve", argv_, env, log_dir, args.port, 600) as (url, _):
        pids = process_tree()
        samples, counts = asyncio.run(soak(url, pids, args))
        metrics = scrape(url)
        units_held = sum(v for (name, _), v in metrics.items() if name == "aptserve:cache_units_used")
    log_text = (log_dir / "aptserve.log").read_text(errors="replace")
    growth = {f"{key}{settled}": growth_per_1000(samples, f"{key}{settled}_rss_mb", args.warmup)
              for key in ("http", "engine_core") for settled in ("", "_settled")}
    result = {"benchmark": "soak", "command": argv_, "settings": vars(args), "answers": dict(counts),
              "units_held_at_end": units_held, "rss_growth_mb_per_1000_after_warmup": growth,
              "tracebacks_in_log": log_text.count("Traceback"), "samples": samples}
    path = write_json(Path(args.out_dir) / f"{args.name}.json", result)
    plot(samples, path.with_suffix(".png"),
         f"{args.num_requests:,} requests at concurrency {args.concurrency}: RSS growth per 1,000 after "
         f"{args.warmup:,}, settled: HTTP {growth['http_settled']} MB, engine core {growth['engine_core_settled']} MB")
    print(f"wrote {path}: answers {dict(counts)}, growth per 1,000 {growth}, units held {units_held}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
