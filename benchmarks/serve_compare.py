"""Online serving: SLO attainment vs request rate of aptserve's and its peers' OpenAI servers (vLLM's CPU build;
with --peers vllm,llamacpp also llama.cpp's llama-server), side by side.

Each server runs alone (the others stopped, so none shares the cores), on the same model folder, float32, the
same KV byte budget (aptserve --kv-cache-memory == vLLM --kv-cache-memory-bytes), max-num-seqs, max-model-len and
cores, and gets the same seeded ShareGPT requests and gamma arrivals at each rate, through the same streaming
client (aptserve.bench). Every rate point replays requests of its own, so vLLM's prefix cache (on, its default)
never serves a prompt from an earlier point. SLOs are --slo-scale x the unloaded latency of --slo-reference
(default vLLM, measured first; see aptserve.bench.serving.UNLOADED_DEFINITION), or explicit seconds.

    .venv/bin/python benchmarks/serve_compare.py                                  # ~40 min on 2 idle cores
    .venv/bin/python benchmarks/serve_compare.py --kv-load-fraction 0.25          # memory pressure
    .venv/bin/python benchmarks/serve_compare.py --aptserve-schedulers fcfs --rates 1,2 --num-requests 20  # smoke

vLLM gets every core for its compute threads (VLLM_CPU_OMP_THREADS_BIND=0-<n-1>, VLLM_CPU_NUM_OF_RESERVED_CPU=0)
and its defaults otherwise (prefix caching, chunked prefill, compiled model); --vllm-eager adds a run with
--enforce-eager, its other CPU mode, and the better of the two is the reference (--vllm-modes picks the modes to
run: compiled, eager or both). aptserve runs torch with
APTSERVE_NUM_THREADS = OMP_NUM_THREADS = --threads. llama-server (benchmarks/llamacpp_env.sh) serves the same folder
converted to GGUF, with --threads threads, max-num-seqs slots and a KV context of the same bytes, in the setup
benchmarks/llamacpp_tuning.py found best (benchmarks/_llamacpp.py; --llamacpp-flags changes it); it is checked up
front, and a peer that cannot run here (no CPU backend for this CPU, a model the converter does not take) is
recorded as skipped, with its reason, and the run goes on.

Writes <out-dir>/<name>.json and .png (name: serve_compare, or --name); server logs go to a temporary folder; the
JSON keeps the lines that show each server's effective settings, and a log's tail when a server fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder
from aptserve.bench.cli import explicit_slos  # noqa: E402
from aptserve.bench.report import plot_results  # noqa: E402
from aptserve.bench.serving import (BenchSpec, bench_server, load_bench_trace, measure_unloaded,  # noqa: E402
                                    slos_from_unloaded, throughput_ratios, trace_stats)
from benchmarks._llamacpp import LlamaCppPeer, parse_flags, prepare_peer, settings_record  # noqa: E402
from benchmarks.common import RESULTS_DIR, fp32_kv_bytes_per_token, load_average, write_json  # noqa: E402
from benchmarks.servers import (LLAMACPP, SERVED_DTYPES, SERVED_NAME, VLLM, aptserve_command,  # noqa: E402
                                llamacpp_command, running_server, scrape, served_dtype, settings_lines, vllm_command,
                                vllm_python)

PEERS = (VLLM, LLAMACPP)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="aptserve model name; vLLM gets its resolved folder")
    parser.add_argument("--kv-cache-memory", type=int, default=None,
                        help="KV bytes for both servers (default: max-num-seqs full-length requests in fp32)")
    parser.add_argument("--kv-load-fraction", type=float, default=None,
                        help="instead: KV for this fraction of the offered load (max-num-seqs x the trace's mean "
                             "prompt + output tokens), e.g. 0.25 for memory pressure")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=100, help="requests per rate point")
    parser.add_argument("--max-prompt-len", type=int, default=512)
    parser.add_argument("--max-output-len", type=int, default=128)
    parser.add_argument("--rates", default="1,2,3,4,5,6",
                        help="comma-separated request rates (req/s), swept in ascending order")
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--slo-scale", type=float, default=5.0)
    parser.add_argument("--ttft-slo", type=float, default=None, help="explicit SLOs (s) instead of --slo-scale")
    parser.add_argument("--tbt-slo", type=float, default=None)
    parser.add_argument("--tpot-slo", type=float, default=None,
                        help="with the two above: vLLM's rule's mean-TPOT bound (default: the TBT SLO)")
    parser.add_argument("--slo-reference", default=None,
                        help="'vllm' or an aptserve server name (default: vllm; with --skip-vllm the first "
                             "of --aptserve-schedulers)")
    parser.add_argument("--aptserve-schedulers", default="fcfs,chunked,apt-chunked",
                        help="comma-separated; NAME:FLAGS adds serve flags, e.g. chunked:--max-num-batched-tokens=256")
    parser.add_argument("--peers", default=VLLM,
                        help="comma-separated peers of aptserve: vllm, llamacpp (e.g. vllm,llamacpp); empty for none")
    parser.add_argument("--skip-vllm", action="store_true", help="drop vllm from --peers")
    parser.add_argument("--vllm-eager", action="store_true", help="also run vLLM with --enforce-eager")
    parser.add_argument("--vllm-modes", default=None,
                        help="vLLM's modes to run, comma-separated: compiled, eager (default: compiled, and eager "
                             "with --vllm-eager)")
    parser.add_argument("--vllm-python", default=None, help="default: the one vllm_cpu_env.sh makes")
    parser.add_argument("--llamacpp-flags", default="",
                        help="llama-server settings over the tuned ones, in its spelling, e.g. '--poll 0 -ub 256 "
                             "-ctk f16 -ctv f16'; also --weights f32|bf16|f16 (the GGUF) and --cpu-backend "
                             "auto|wheel|avx2")
    parser.add_argument("--dtype", default="float32", choices=SERVED_DTYPES,
                        help="of aptserve and vLLM alike; 'default': no flag, the defaults side by side")
    parser.add_argument("--threads", type=int, default=2, help="compute threads (cores) of each server")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--request-timeout", type=float, default=180.0)
    parser.add_argument("--name", default="serve_compare", help="file name of the results")
    parser.add_argument("--dataset", default="sharegpt", choices=("sharegpt", "sharegpt-multiturn", "shared-prefix"),
                        help="sharegpt: independent requests; the others share prefixes (multi-turn conversations "
                             "replayed turn by turn; 4 system prompts of 512 tokens x users) for prefix caching")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    args.skipped_peers = []
    return args


def log(message: str) -> None:
    print(f"[serve_compare {time.strftime('%H:%M:%S')}] {message}", flush=True)


def max_model_len(args) -> int:
    return args.max_prompt_len + args.max_output_len


def peers(args) -> list[str]:
    """--peers less --skip-vllm and the peers found unable to run here (args.skipped_peers)."""
    names = [name for name in args.peers.split(",") if name]
    unknown = set(names) - set(PEERS)
    if unknown:
        raise SystemExit(f"unknown --peers {sorted(unknown)}; known: {', '.join(PEERS)}")
    dropped = set(args.skipped_peers) | ({VLLM} if args.skip_vllm else set())
    return [name for name in names if name not in dropped]


def is_peer(name: str) -> bool:
    """vLLM and llama.cpp are measured at their own settings; only aptserve takes the SLOs on its command line."""
    return name.startswith(PEERS)


def server_command(args, name: str, model_dir: str, kv_bytes: int, slos: dict | None) -> tuple[list[str], dict]:
    """vLLM's server (default or eager), llama.cpp's, or aptserve with a scheduler (and extra flags after a
    colon); the apt policies schedule against the benchmark's SLOs, so aptserve gets them too."""
    common = (kv_bytes, args.max_num_seqs, max_model_len(args), args.port, args.threads)
    if name.startswith(VLLM):
        return vllm_command(vllm_python(args.vllm_python), model_dir, *common, eager=name.endswith("eager"),
                            dtype=served_dtype(args.dtype))
    if name == LLAMACPP:
        peer: LlamaCppPeer = args.llamacpp_peer
        return llamacpp_command(peer.server, str(peer.gguf), model_dir, *common,
                                settings=parse_flags(args.llamacpp_flags), cpu_backend=peer.cpu_backend)
    scheduler, _, flags = name.removeprefix("aptserve-").partition(":")
    extra = flags.replace("=", " ").split()
    if slos:
        extra += ["--ttft-slo", str(slos["ttft_slo_s"]), "--tbt-slo", str(slos["tbt_slo_s"])]
    return aptserve_command(args.model, *common, scheduler=scheduler, extra=extra, dtype=served_dtype(args.dtype))


def vllm_names(args) -> list[str]:
    modes = (args.vllm_modes or ("compiled,eager" if args.vllm_eager else "compiled")).split(",")
    unknown = set(modes) - {"compiled", "eager"}
    if unknown:
        raise SystemExit(f"--vllm-modes takes compiled and/or eager, not {sorted(unknown)}")
    return [{"compiled": VLLM, "eager": f"{VLLM}-eager"}[mode] for mode in modes]


def server_names(args) -> list[str]:
    """The servers to measure, the SLO reference first (its unloaded latency sets the SLOs)."""
    names = []
    for peer in peers(args):
        names += vllm_names(args) if peer == VLLM else [peer]
    names += [f"aptserve-{s}" for s in args.aptserve_schedulers.split(",") if s]  # '': the peers alone
    reference = args.slo_reference or names[0]
    reference = reference if is_peer(reference) or reference in names else f"aptserve-{reference}"
    if args.ttft_slo is None and reference not in names:
        raise SystemExit(f"--slo-reference {args.slo_reference!r} is not among the servers {names}")
    return sorted(names, key=lambda name: name != reference)


def probe_slos(args, name: str, model_dir: str, kv_bytes: int, spec: BenchSpec, log_dir: Path) -> dict:
    """SLOs from one server's unloaded latency, on a server started only for that (aptserve takes its SLOs on
    the command line, so it cannot be started for the sweep before they are known)."""
    argv, env = server_command(args, name, model_dir, kv_bytes, None)
    with running_server(f"{name}-probe", argv, env, log_dir, args.port, args.startup_timeout) as (url, _):
        return slos_from_unloaded(measure_unloaded(url, spec), args.slo_scale)


def bench_one(args, name: str, model_dir: str, kv_bytes: int, spec: BenchSpec, slos: dict | None,
              log_dir: Path) -> tuple[dict, dict | None]:
    """Start one server, probe its unloaded latency (and set the SLOs if none yet), sweep, stop it. A failure is
    recorded in the result so the other servers still run."""
    if slos is None and not is_peer(name):
        slos = probe_slos(args, name, model_dir, kv_bytes, spec, log_dir)
    result = {"load_average_before": load_average()}
    try:
        argv, env = server_command(args, name, model_dir, kv_bytes, slos)
        log(f"starting {name}: {' '.join(argv)}")
        result |= {"command": argv, "env": env}
        with running_server(name, argv, env, log_dir, args.port, args.startup_timeout) as (url, startup_s):
            unloaded = measure_unloaded(url, spec)
            if slos is None:
                slos = slos_from_unloaded(unloaded, args.slo_scale)
                log(f"SLOs, {args.slo_scale:g}x {name}'s unloaded latency: TTFT {slos['ttft_slo_s']:.3f} s, P99 TBT "
                    f"{slos['tbt_slo_s']:.3f} s, mean TPOT {slos['tpot_slo_s']:.3f} s")
            result |= {"startup_s": round(startup_s, 1), "unloaded": unloaded, **bench_server(url, spec, slos, name)}
            if not is_peer(name):  # what its scheduler chose over the sweep (the unloaded probe included)
                result["engine_counters"] = engine_counters(url)
        result["settings_log_lines"] = settings_lines(log_dir / f"{name}.log")
    except Exception as error:  # noqa: BLE001 - recorded in the JSON, the run goes on
        result["error"] = f"{type(error).__name__}: {error}"
        log(f"{name} failed: {result['error'][:1000]}")
    result["load_average_after"] = load_average()
    return result, slos


def engine_counters(url: str) -> dict[str, float]:
    """An aptserve server's preemptions, demotions and admissions by cache kind since it started."""
    wanted = ("aptserve:num_preemptions_total", "aptserve:num_demotions_total", "aptserve:admissions_total")
    return {name.removeprefix("aptserve:") + "".join(f"[{v}]" for _, v in labels): value
            for (name, labels), value in scrape(url).items() if name in wanted}


def slo_origin(args) -> str:
    if args.ttft_slo is not None:
        return "explicit"
    return f"{args.slo_scale:g}x unloaded {server_names(args)[0]}"


def kv_budget(args, model_dir: str, trace) -> int:
    """The KV bytes both servers get: explicit, a fraction of the offered load, or all requests at full length."""
    if args.kv_cache_memory is not None:
        return args.kv_cache_memory
    per_token = fp32_kv_bytes_per_token(model_dir)
    if args.kv_load_fraction is not None:
        mean_tokens = sum(r.prompt_len + r.output_len for r in trace) / len(trace)
        return int(args.kv_load_fraction * args.max_num_seqs * mean_tokens * per_token)
    return args.max_num_seqs * max_model_len(args) * per_token


def reference_name(servers: dict) -> str | None:
    """vLLM's better mode (by effective throughput under the paper's rule, then vLLM's) is the reference; without
    vLLM, llama.cpp."""
    def score(name: str) -> tuple:
        rates = servers[name].get("effective_throughput") or {}
        return tuple((rates.get(rule) or {}).get("interpolated_rate") or 0.0 for rule in ("paper", "vllm"))

    for peer in PEERS:
        candidates = [name for name in servers if name.startswith(peer) and "points" in servers[name]]
        if candidates:
            return max(candidates, key=score)
    return None


def prepare_llamacpp(args, model_dir: str) -> dict | None:
    """Install, convert and probe llama.cpp up front (args.llamacpp_peer); when it cannot run here, drop it from
    the peers and return its record with the one-line reason, so the JSON says why it is missing."""
    if LLAMACPP not in peers(args):
        return None
    settings = parse_flags(args.llamacpp_flags)
    record = {"settings": settings_record(settings)}
    try:
        peer = prepare_peer(model_dir, settings, args.port)
    except (RuntimeError, OSError) as error:
        args.skipped_peers.append(LLAMACPP)
        log(f"{LLAMACPP} skipped: {error}")
        return record | {"skipped": str(error)}
    args.llamacpp_peer = peer
    log(f"{LLAMACPP}: {peer.gguf}, CPU backend {peer.cpu_backend} (probes: {peer.probes})")
    return record | {"gguf": str(peer.gguf), "cpu_backend": peer.cpu_backend, "cpu_backend_probes": peer.probes}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from aptserve.registry import load_tokenizer, resolve_model

    model_dir = resolve_model(args.model)
    rates = tuple(float(r) for r in args.rates.split(","))
    # One window of requests for the probes, then one per rate point.
    options = {} if args.dataset == "shared-prefix" else {"max_prompt_len": args.max_prompt_len}
    pool = load_bench_trace(args.dataset, load_tokenizer(model_dir), args.num_requests * (len(rates) + 1),
                            args.seed, args.max_output_len, **options)
    # The servers' context must hold every request (the shared-prefix trace sets its own prompt lengths); vLLM would
    # otherwise cut max_tokens to fit, and aptserve refuse the request, as OpenAI does.
    args.max_prompt_len = max(args.max_prompt_len, max(r.prompt_len for r in pool))
    windows = [tuple(pool[i * args.num_requests:(i + 1) * args.num_requests]) for i in range(len(rates) + 1)]
    spec = BenchSpec(model=SERVED_NAME, trace=windows[0], rates=rates, cv=args.cv, seed=args.seed,
                     target=args.target, timeout_s=args.request_timeout, windows=tuple(windows[1:]))
    kv_bytes = kv_budget(args, model_dir, pool)
    if (args.ttft_slo is None) != (args.tbt_slo is None):
        raise SystemExit("give both --ttft-slo and --tbt-slo, or neither (then --slo-scale applies)")
    slos = None if args.ttft_slo is None else explicit_slos(args.ttft_slo, args.tbt_slo, args.tpot_slo)
    log(f"model {model_dir}; KV {kv_bytes / 2**20:.0f} MiB; trace {trace_stats(pool)}; load {load_average()}")
    llamacpp = prepare_llamacpp(args, model_dir)
    servers = {LLAMACPP: llamacpp} if llamacpp and "skipped" in llamacpp else {}
    with tempfile.TemporaryDirectory(prefix="serve-compare-") as log_dir:
        for name in server_names(args):
            servers[name], slos = bench_one(args, name, model_dir, kv_bytes, spec, slos, Path(log_dir))
            if name == LLAMACPP:
                servers[name] = llamacpp | servers[name]
            if slos is None:
                raise SystemExit(f"the SLO reference {name} failed: {servers[name].get('error')}")
    reference = reference_name(servers)
    payload = {
        "benchmark": "serve_compare",
        "config": {**{k: v for k, v in vars(args).items() if k != "llamacpp_peer"}, "model_dir": model_dir, "max_model_len": max_model_len(args),
                   "kv_cache_memory_bytes": kv_bytes, "api": spec.api, "ignore_eos": True,
                   "requests_per_point": args.num_requests, "fresh_requests_per_point": True},
        "trace": trace_stats(pool), "slo": slos, "servers": servers, "reference": reference,
        "ratios": throughput_ratios(servers, reference) if reference else {},
        "title": (f"{args.dataset} (prompt <= {args.max_prompt_len}, output <= {args.max_output_len}) x "
                  f"{args.num_requests} requests per rate, cv {args.cv:g}, SLOs ({slo_origin(args)}): TTFT "
                  f"{slos['ttft_slo_s']:.3g} s, P99 TBT {slos['tbt_slo_s']:.3g} s; "
                  f"KV {kv_bytes / 2**20:.0f} MiB, max-num-seqs {args.max_num_seqs}, "
                  f"{args.threads} cores each, {os.cpu_count()} CPUs"),
    }
    out_dir = Path(args.out_dir)
    json_path = write_json(out_dir / f"{args.name}.json", payload)
    # Only measured servers have curves (a skipped or failed one would empty the CDFs' common rates).
    plot_results(out_dir / f"{args.name}.png",
                 payload | {"servers": {name: s for name, s in servers.items() if "points" in s}})
    for name, server in servers.items():
        outcome = server.get("effective_throughput") or server.get("error") or f"skipped: {server.get('skipped')}"
        log(f"{name}: effective throughput {outcome}")
    log(f"ratios over {reference}: {json.dumps(payload['ratios'])}; wrote {json_path}")
    return 0 if all("points" in s or "skipped" in s for s in servers.values()) else 1


if __name__ == "__main__":  # vLLM spawns processes; keep module import side-effect free
    sys.exit(main())
