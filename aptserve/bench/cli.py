"""`aptserve bench run | compare`: SLO attainment and effective throughput of OpenAI-compatible servers.

    aptserve bench run --base-url http://127.0.0.1:8000 --model default --dataset sharegpt --num-requests 50 \
        --rates 0.5,1,2 --slo-scale 5 --out results.json --plot results.png
    aptserve bench compare --base-url aptserve=http://127.0.0.1:8000 --base-url vllm=http://127.0.0.1:8001 ...

Every server gets the same trace (loaded with the served model's tokenizer, seeded) and, at each rate, the same
seeded gamma arrivals; servers are measured one after another. Effective throughput = the highest rate whose SLO
attainment (paper rule) >= --target.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
from pathlib import Path

from aptserve.bench.serving import (BenchSpec, bench_server, load_bench_trace, measure_unloaded,
                                    slos_from_unloaded, throughput_ratios, trace_stats)

DATASETS = ("sharegpt", "sharegpt-multiturn", "shared-prefix", "humaneval", "longbench", "synthetic")
# Loader options each dataset takes (see aptserve.bench.traces.load_trace).
DATASET_OPTIONS = {"sharegpt": ("max_prompt_len", "max_total_len"), "sharegpt-multiturn": ("max_prompt_len",),
                   "shared-prefix": ("num_prefixes", "prefix_len", "prompt_len", "output_len"), "humaneval": (),
                   "longbench": ("target_prompt_len",), "synthetic": ("prompt_len", "output_len")}
TRACE_OPTIONS = ("max_prompt_len", "max_total_len", "target_prompt_len", "prompt_len", "output_len", "num_prefixes",
                 "prefix_len")


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of rates: {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {text!r}")
    return rates


def _named_url(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise argparse.ArgumentTypeError(f"expected NAME=URL, got {text!r}")
    return name, url


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="the model name requests carry (the served name)")
    parser.add_argument("--tokenizer", default=None,
                        help="HF folder of the tokenizer that counts trace lengths (default: --model's folder)")
    data = parser.add_argument_group("trace")
    data.add_argument("--dataset", default="sharegpt", choices=DATASETS)
    data.add_argument("--num-requests", type=int, default=50)
    data.add_argument("--max-output-len", type=int, default=None, help="keep only requests with output <= this")
    for option in TRACE_OPTIONS:
        data.add_argument("--" + option.replace("_", "-"), type=int, default=None,
                          help="for " + " / ".join(d for d, opts in DATASET_OPTIONS.items() if option in opts))
    load = parser.add_argument_group("load")
    load.add_argument("--rate", type=float, default=None, help="one request rate (req/s)")
    load.add_argument("--rates", type=_rates, default=None, help="comma-separated rates to sweep, e.g. 0.5,1,2")
    load.add_argument("--cv", type=float, default=1.0, help="CV of gamma inter-arrivals (1: Poisson)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--bisect", action="store_true", help="after the sweep, bisect between pass and fail")
    load.add_argument("--max-probes", type=int, default=8, help="most rates measured with --bisect")
    load.add_argument("--api", default="completions", choices=["completions", "chat"])
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request fails")
    slo = parser.add_argument_group("SLOs (explicit seconds, or --slo-scale)")
    slo.add_argument("--ttft-slo", type=float, default=None)
    slo.add_argument("--tbt-slo", type=float, default=None, help="P99 TBT SLO (paper rule)")
    slo.add_argument("--tpot-slo", type=float, default=None, help="mean TPOT SLO (vLLM rule); default --tbt-slo")
    slo.add_argument("--slo-scale", type=float, default=None,
                     help="SLOs = this x the unloaded latency, measured first (on --baseline for compare)")
    slo.add_argument("--num-slo-probes", type=int, default=5)
    slo.add_argument("--probe-max-tokens", type=int, default=32)
    slo.add_argument("--target", type=float, default=0.9, help="attainment that counts as meeting the SLOs")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="bench_results.json")
    out.add_argument("--plot", default=None, help="PNG: attainment vs rate, TTFT and TBT CDFs")
    out.add_argument("--no-progress", action="store_true")


def add_bench_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True)
    run = sub.add_parser("run", help="sweep request rates against one server")
    run.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    run.add_argument("--name", default="server", help="label of the server in the JSON and plot")
    _add_common_args(run)
    run.set_defaults(func=cmd_bench)
    compare = sub.add_parser("compare", help="the same trace and rates against several servers, one at a time")
    compare.add_argument("--base-url", type=_named_url, action="append", required=True, metavar="NAME=URL")
    compare.add_argument("--baseline", default=None,
                         help="server whose throughput the ratios divide by and whose unloaded latency sets "
                              "--slo-scale SLOs (default: the first --base-url)")
    _add_common_args(compare)
    compare.set_defaults(func=cmd_bench)


def _servers(args: argparse.Namespace) -> dict[str, str]:
    """name -> URL, the baseline first (its unloaded latency sets the SLOs)."""
    pairs = args.base_url if args.bench_command == "compare" else [(args.name, args.base_url)]
    servers = dict(pairs)
    if len(servers) != len(pairs):
        raise SystemExit("each --base-url needs a distinct NAME")
    baseline = getattr(args, "baseline", None) or next(iter(servers))
    if baseline not in servers:
        raise SystemExit(f"--baseline {baseline!r} is none of {list(servers)}")
    return {baseline: servers[baseline], **servers}


def _check_args(args: argparse.Namespace) -> None:
    if (args.rate is None) == (args.rates is None):
        raise SystemExit("give exactly one of --rate R or --rates R1,R2,...")
    if args.rate is not None and not args.rate > 0:
        raise SystemExit(f"--rate must be > 0, got {args.rate}")
    explicit = args.ttft_slo is not None and args.tbt_slo is not None
    if explicit == (args.slo_scale is not None):
        raise SystemExit("give either both --ttft-slo and --tbt-slo, or --slo-scale")
    for option in TRACE_OPTIONS:
        if getattr(args, option) is not None and option not in DATASET_OPTIONS[args.dataset]:
            raise SystemExit(f"--{option.replace('_', '-')} does not apply to --dataset {args.dataset}")


def tokenizer_path(model: str, tokenizer: str | None) -> str:
    """--tokenizer, else the folder aptserve resolves the served model name to."""
    if tokenizer:
        return tokenizer
    from aptserve.errors import UnknownModelError
    from aptserve.registry import resolve_model

    try:
        return resolve_model(model)
    except UnknownModelError:
        raise SystemExit(f"cannot find a tokenizer for --model {model!r}: pass --tokenizer PATH "
                         "(the HF folder of the served model)") from None


def load_cli_trace(args: argparse.Namespace, tokenizer: str) -> list:
    """The trace the trace flags ask for, its lengths counted with `tokenizer`; a dataset that cannot fill it is a
    usage error, not a traceback."""
    from aptserve.registry import load_tokenizer

    options = {o: getattr(args, o) for o in DATASET_OPTIONS[args.dataset] if getattr(args, o) is not None}
    try:
        return load_bench_trace(args.dataset, load_tokenizer(tokenizer), args.num_requests, args.seed,
                                args.max_output_len, **options)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc


def build_spec(args: argparse.Namespace) -> tuple[BenchSpec, str]:
    path = tokenizer_path(args.model, args.tokenizer)
    trace = load_cli_trace(args, path)
    spec = BenchSpec(model=args.model, trace=tuple(trace), rates=tuple(args.rates or [args.rate]), cv=args.cv,
                     seed=args.seed, target=args.target, api=args.api, max_concurrency=args.max_concurrency,
                     timeout_s=args.request_timeout, bisect=args.bisect, max_num_probes=args.max_probes,
                     progress=not args.no_progress)
    return spec, path


def explicit_slos(ttft_slo_s: float, tbt_slo_s: float, tpot_slo_s: float | None) -> dict:
    return {"ttft_slo_s": ttft_slo_s, "tbt_slo_s": tbt_slo_s,
            "tpot_slo_s": tbt_slo_s if tpot_slo_s is None else tpot_slo_s, "source": "explicit"}


def load_average() -> list[float] | None:
    """1/5/15-minute load: other processes on a small machine skew every latency, so results record it."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict:
    """Where and when it ran: results are only comparable side by side on one machine."""
    return {"created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "python": platform.python_version(), "num_cpus": os.cpu_count(),
            "load_average": load_average()}


def bench_servers(servers: dict[str, str], spec: BenchSpec, args: argparse.Namespace) -> tuple[dict, dict]:
    """Each server in turn (the baseline first); a failing server is recorded and the others still run."""
    slos = None if args.slo_scale else explicit_slos(args.ttft_slo, args.tbt_slo, args.tpot_slo)
    results = {}
    for name, url in servers.items():
        load_before = load_average()
        try:
            unloaded = measure_unloaded(url, spec, args.num_slo_probes, args.probe_max_tokens)
            slos = slos or slos_from_unloaded(unloaded, args.slo_scale)
            results[name] = {"unloaded": unloaded, **bench_server(url, spec, slos, name)}
        except Exception as error:  # noqa: BLE001 - recorded in the JSON; the other servers still run
            if slos is None:
                raise SystemExit(f"baseline {name} ({url}) failed before the SLOs were set: {error}") from error
            results[name] = {"base_url": url, "error": f"{type(error).__name__}: {error}"}
        results[name].update(load_average_before=load_before, load_average_after=load_average())
    return results, slos


def cmd_bench(args: argparse.Namespace) -> int:
    _check_args(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would bury the progress
    servers = _servers(args)
    spec, tokenizer = build_spec(args)
    results, slos = bench_servers(servers, spec, args)
    baseline = next(iter(servers))
    config = {k: v for k, v in vars(args).items() if k != "func"} | {"tokenizer": tokenizer, "rates": spec.rates}
    result = {"benchmark": f"aptserve bench {args.bench_command}", "environment": environment(), "config": config,
              "trace": trace_stats(spec.trace), "slo": slos, "baseline": baseline, "servers": results,
              "ratios": throughput_ratios(results, baseline),
              "title": (f"{args.dataset} x {len(spec.trace)} requests, cv {args.cv:g}, TTFT SLO "
                        f"{slos['ttft_slo_s']:.3g} s, P99 TBT SLO {slos['tbt_slo_s']:.3g} s, target {args.target:g}")}
    write_result(result, args.out, args.plot)
    return 0 if all("points" in s for s in results.values()) else 1


def write_result(result: dict, out: str, plot: str | None) -> None:
    """The JSON (and the PNG) of a sweep, measured or simulated, and a line per server."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        from aptserve.bench.report import plot_results
        plot_results(plot, result)
    for name, server in result["servers"].items():
        print(f"{name}: effective throughput {server.get('effective_throughput', server.get('error'))}")
    print(f"ratios: {result['ratios']}\nwrote {out}" + (f" and {plot}" if plot else ""))

