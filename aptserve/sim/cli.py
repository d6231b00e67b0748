"""`aptserve sim`: `aptserve bench run` on a simulated clock: the real engine and policies (built by the same
resolve() as a served engine) over a cost model instead of a model, at scales no machine here has.

    aptserve sim --model opt-13b --gpu a100-40gb --dataset sharegpt --num-requests 1000 --rates 1,2,4 \
        --ttft-slo 0.25 --tbt-slo 0.1 --policies fcfs,chunked,apt,apt-chunked --out sim.json --plot sim.png

The trace, arrival, SLO and output flags are `aptserve bench`'s; the engine flags are `aptserve serve`'s. With
--gpu the roofline cost model prices each step and the KV budget is the GPU's memory less weights and activations
(unless --kv-cache-memory is given); without, the linear CPU-scale model. The same seed gives the same JSON, byte
for byte (it holds no wall-clock figure).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from tqdm.auto import tqdm

from aptserve.bench.arrivals import gamma_send_offsets_s
from aptserve.bench.cli import _add_common_args, _check_args, explicit_slos, tokenizer_path, write_result
from aptserve.bench.serving import (effective_throughput, load_bench_trace, slos_from_unloaded, sweep_point,
                                    throughput_ratios, trace_stats, unloaded_latency)
from aptserve.checkpoints import OPT_SHAPES
from aptserve.config import ModelConfig
from aptserve.engine_args import CHUNKED_DEFAULT_BATCHED_TOKENS, EngineArgs
from aptserve.sim.executor import CostModel, CostModelExecutor, LinearCostModel
from aptserve.sim.gpus import GPUS, gpu_spec
from aptserve.sim.profile import load_profile
from aptserve.sim.roofline import RooflineCostModel
from aptserve.sim.simulator import sim_engine, simulate


def add_sim_parser(sub: argparse._SubParsersAction) -> None:
    # `resolve`: the bench flags --model and --seed stand for the engine's too (the model simulated, the seed).
    sim = sub.add_parser("sim", help="simulate serving a trace on a cost model (GPU roofline or CPU linear)",
                         conflict_handler="resolve", description=__doc__.split("\n\n")[0])
    EngineArgs.add_cli_args(sim)
    _add_common_args(sim)
    group = sim.add_argument_group("simulation")
    group.add_argument("--gpu", default=None, choices=tuple(GPUS), help="price steps with the roofline of this GPU")
    group.add_argument("--cost-model", default=None, metavar="PROFILE_JSON",
                       help="price steps with the coefficients `aptserve profile` fitted on a real engine")
    group.add_argument("--tensor-parallel", type=int, default=1, help="GPUs per replica (with --gpu)")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="with --gpu, as vLLM's")
    group.add_argument("--step-overhead-s", type=float, default=0.0,
                       help="seconds a served step costs beyond the forward pass (the step_phase_seconds of "
                            "schedule, update, output and gap on a server's /metrics)")
    group.add_argument("--request-latency-s", type=float, default=0.0,
                       help="the served path's fixed latency per token delivered (HTTP, tokenization, the engine "
                            "hop): added to every token's time")
    group.add_argument("--slo-aware", action="store_true",
                       help="give the engine the SLOs the run is judged by, as requests carrying ttft_slo and tbt_slo "
                            "would (default: the engine's defaults, as for requests that carry none)")
    group.add_argument("--policies", default=None,
                       help="comma-separated schedulers to compare on the same trace (default: --scheduler)")
    sim.set_defaults(func=cmd_sim, kv_cache_memory=None, dtype=None)


def model_config(name: str, max_model_len: int | None) -> ModelConfig:
    """A published OPT shape needs no folder (its weights could not be built here); else the folder's config."""
    from aptserve.registry import load_model_config, resolve_model, shape_model_config

    if name in OPT_SHAPES:
        return shape_model_config(name, max_model_len)
    return load_model_config(resolve_model(name), max_model_len, served_name=name)


def engine_args(args: argparse.Namespace, policy: str, config: ModelConfig, cost_model: CostModel,
                slos: dict | None) -> EngineArgs:
    """The engine flags of one simulated run. Its default SLOs are the engine's own, as on a server whose requests
    carry none; with --slo-aware, those the run is judged by (as if every request carried them)."""
    fields = dataclasses.asdict(EngineArgs.from_cli_args(args))
    aware = args.slo_aware and slos is not None
    fields.update(scheduler=policy, dtype=args.dtype or ("float16" if args.gpu else "float32"),
                  ttft_slo=slos["ttft_slo_s"] if aware else EngineArgs.ttft_slo,
                  tbt_slo=slos["tbt_slo_s"] if aware else EngineArgs.tbt_slo)
    if fields["kv_cache_memory"] is None:
        if isinstance(cost_model, RooflineCostModel):
            batched = args.max_num_batched_tokens or max(config.max_model_len, CHUNKED_DEFAULT_BATCHED_TOKENS)
            fields["kv_cache_memory"] = cost_model.kv_cache_bytes(batched, args.gpu_memory_utilization)
        else:
            fields["kv_cache_memory"] = EngineArgs.kv_cache_memory
    return EngineArgs(**fields)


def cmd_sim(args: argparse.Namespace) -> int:
    from aptserve.registry import load_tokenizer

    _check_args(args)
    config = model_config(args.model, args.max_model_len)
    cost_model: CostModel = LinearCostModel()
    if args.gpu and args.cost_model:
        raise SystemExit("give --gpu (the roofline) or --cost-model (a profile), not both")
    if args.cost_model:
        cost_model = load_profile(args.cost_model)
    if args.gpu:
        cost_model = RooflineCostModel(config, gpu_spec(args.gpu), args.tensor_parallel, args.dtype or "float16")
    policies = (args.policies or args.scheduler).split(",")
    # OPT shapes share the default model's tokenizer (and a folder would mean building their weights).
    tokenizer = tokenizer_path("default" if args.model in OPT_SHAPES else args.model, args.tokenizer)
    options = {o: getattr(args, o) for o in ("max_prompt_len", "max_total_len", "target_prompt_len", "prompt_len",
                                             "output_len") if getattr(args, o) is not None}
    trace = load_bench_trace(args.dataset, load_tokenizer(tokenizer), args.num_requests, args.seed,
                             args.max_output_len, **options)
    rates = args.rates or [args.rate]

    def executor(clock, model):
        return CostModelExecutor(clock, model, step_overhead_s=args.step_overhead_s)

    def run(policy: str, slos: dict | None, requests, offsets_s, progress=None):
        engine, clock = sim_engine(engine_args(args, policy, config, cost_model, slos), config, cost_model,
                                   make_executor=executor)
        return simulate(engine, clock, requests, offsets_s, progress=progress,
                        request_latency_s=args.request_latency_s)

    if args.slo_scale:  # the first policy alone on the simulated system sets them
        unloaded = unloaded_latency(lambda request: run(policies[0], None, [request], [0.0])[0], trace,
                                    args.num_slo_probes, args.probe_max_tokens)
        slos = slos_from_unloaded(unloaded, args.slo_scale)
    else:
        slos = explicit_slos(args.ttft_slo, args.tbt_slo, args.tpot_slo)
    servers = {}
    with tqdm(total=len(policies) * len(rates) * len(trace), unit="req", disable=args.no_progress) as progress:
        for policy in policies:
            points = []
            for rate in rates:
                records = run(policy, slos, trace, gamma_send_offsets_s(len(trace), rate, args.cv, args.seed),
                              progress)
                end_s = max((r.token_times_s[-1] for r in records if r.token_times_s), default=1e-9)
                points.append(sweep_point(rate, records, end_s, slos))
            servers[policy] = {"points": points, "effective_throughput": effective_throughput(points, args.target)}
    result = {"benchmark": "aptserve sim", "config": _config(args, cost_model), "trace": trace_stats(trace),
              "slo": slos, "baseline": policies[0], "servers": servers,
              "ratios": throughput_ratios(servers, policies[0]),
              "title": (f"simulated {args.model} on {_system(args)}: {args.dataset} x {len(trace)} requests, cv "
                        f"{args.cv:g}, TTFT SLO {slos['ttft_slo_s']:.3g} s, P99 TBT SLO {slos['tbt_slo_s']:.3g} s")}
    write_result(result, args.out, args.plot)
    return 0


def _system(args: argparse.Namespace) -> str:
    if args.gpu:
        return f"{args.tensor_parallel} x {args.gpu}"
    return f"the profile {Path(args.cost_model).name}" if args.cost_model else "the linear CPU cost model"


def _config(args: argparse.Namespace, cost_model: CostModel) -> dict:
    config = {k: v for k, v in vars(args).items() if k not in ("func", "no_progress")}
    config["rates"] = args.rates or [args.rate]
    config["cost_model"] = {"kind": type(cost_model).__name__, **{
        k: v for k, v in dataclasses.asdict(cost_model).items() if k not in ("model", "gpu")}}
    return config
