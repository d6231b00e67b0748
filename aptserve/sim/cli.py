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
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from aptserve.bench.arrivals import gamma_send_offsets_s
from aptserve.bench.cli import (_add_common_args, _check_args, explicit_slos, load_cli_trace, tokenizer_path,
                                write_result)
from aptserve.bench.datasets import TraceRequest
from aptserve.bench.metrics import RequestRecord
from aptserve.bench.serving import (effective_throughput, slos_from_unloaded, sweep_point,
                                    throughput_ratios, trace_stats, unloaded_latency)
from aptserve.bench.sweep import sweep_rates, sweep_then_bisect
from aptserve.checkpoints import OPT_SHAPES
from aptserve.cluster.args import RoutingArgs
from aptserve.cluster.policy import RouteRequest, make_policy
from aptserve.config import ModelConfig
from aptserve.engine_args import EngineArgs, asks_demotion
from aptserve.sched import policy_class
from aptserve.sched.chunked import CHUNKED_MAX_NUM_BATCHED_TOKENS
from aptserve.sim.executor import CostModel, CostModelExecutor, LinearCostModel, SimClock
from aptserve.sim.gpus import GPUS, gpu_spec
from aptserve.sim.profile import load_profile
from aptserve.sim.roofline import RooflineCostModel
from aptserve.sim.cluster import simulate_cluster
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
    group.add_argument("--step-time-scale", type=float, default=1.0,
                       help="how much slower a served forward pass runs than the cost model says (a server's "
                            "forward seconds over the simulated ones for the same run; see sim_validation.py)")
    group.add_argument("--request-latency-s", type=float, default=0.0,
                       help="the served path's fixed latency per token delivered (HTTP, tokenization, the engine "
                            "hop): added to every token's time")
    group.add_argument("--slo-aware", action="store_true",
                       help="give the engine the SLOs the run is judged by, as requests carrying ttft_slo and tbt_slo "
                            "would (default: the engine's defaults, as for requests that carry none)")
    group.add_argument("--policies", default=None,
                       help="comma-separated schedulers to compare on the same trace (default: --scheduler)")
    RoutingArgs.add_cli_args(sim)
    # The flag's earlier name in the simulator.
    sim.add_argument("--snapshot-staleness-s", dest="routing_stats_period_s", type=float, default=argparse.SUPPRESS,
                     help=argparse.SUPPRESS)
    sim.set_defaults(func=cmd_sim, kv_cache_memory=None, dtype=None)


def model_config(name: str, max_model_len: int | None) -> ModelConfig:
    """A published OPT shape needs no folder (its weights could not be built here); else the folder's config."""
    from aptserve.registry import load_model_config, resolve_model, shape_model_config

    if name in OPT_SHAPES:
        return shape_model_config(name, max_model_len)
    return load_model_config(resolve_model(name), max_model_len, served_name=name)


def engine_args(args: argparse.Namespace, policy: str, config: ModelConfig, cost_model: CostModel,
                slos: dict | None, **overrides) -> EngineArgs:
    """The engine flags of one simulated run. Its default SLOs are the engine's own, as on a server whose requests
    carry none; with --slo-aware, those the run is judged by (as if every request carried them)."""
    fields = dataclasses.asdict(EngineArgs.from_cli_args(args))
    aware = args.slo_aware and slos is not None
    fields.update(scheduler=policy, dtype=args.dtype or ("float16" if args.gpu else "float32"),
                  ttft_slo=slos["ttft_slo_s"] if aware else EngineArgs.ttft_slo,
                  tbt_slo=slos["tbt_slo_s"] if aware else EngineArgs.tbt_slo, **overrides)
    if fields["kv_cache_memory"] is None:
        if isinstance(cost_model, RooflineCostModel):
            batched = args.max_num_batched_tokens or max(config.max_model_len, CHUNKED_MAX_NUM_BATCHED_TOKENS)
            fields["kv_cache_memory"] = cost_model.kv_cache_bytes(
                batched, args.gpu_memory_utilization, demote_in_place=asks_demotion(fields["preemption_mode"]))
        else:
            fields["kv_cache_memory"] = EngineArgs.kv_cache_memory
    return EngineArgs(**fields)


@dataclasses.dataclass
class Simulation:
    """One model on one simulated system with one trace: each run replays the trace under a policy and an
    arrival pattern through a fresh engine built by the same resolve() as a served one."""
    args: argparse.Namespace
    config: ModelConfig
    cost_model: CostModel
    trace: list[TraceRequest]

    @classmethod
    def from_args(cls, args: argparse.Namespace, trace: list[TraceRequest] | None = None) -> Simulation:
        _check_args(args)
        if args.gpu and args.cost_model:
            raise SystemExit("give --gpu (the roofline) or --cost-model (a profile), not both")
        if args.step_time_scale <= 0 or args.step_overhead_s < 0 or args.request_latency_s < 0:
            raise SystemExit("--step-time-scale must be > 0, --step-overhead-s and --request-latency-s >= 0")
        try:
            RoutingArgs.from_cli_args(args)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        config = model_config(args.model, args.max_model_len)
        cost_model: CostModel = LinearCostModel()
        if args.cost_model:
            cost_model = load_profile(args.cost_model)
        if args.gpu:
            cost_model = RooflineCostModel(config, gpu_spec(args.gpu), args.tensor_parallel, args.dtype or "float16")
        for policy in (args.policies or args.scheduler).split(","):
            policy_class(policy)  # an unknown name fails now, not after the policies before it ran
        trace = load_sim_trace(args) if trace is None else trace
        if trace and all(request.prompt_len >= config.max_model_len for request in trace):
            raise SystemExit(f"no prompt of the trace fits {args.model}'s context of {config.max_model_len} tokens "
                             f"(the shortest has {min(r.prompt_len for r in trace)}): lower --target-prompt-len or "
                             "choose another --dataset or --model")
        return cls(args, config, cost_model, trace)

    def run(self, policy: str, slos: dict | None, offsets_s: Sequence[float], requests=None, progress=None,
            **engine_flags) -> list[RequestRecord]:
        """The trace (or `requests`) sent at `offsets_s`; `engine_flags` override the args' (e.g. hybrid_cache)."""
        return self._run(policy, slos, offsets_s, requests, progress, **engine_flags)[0]

    def point(self, policy: str, slos: dict, rate: float, progress=None, **engine_flags) -> dict:
        """One sweep point: the trace at `rate` (bench's seeded gamma arrivals), summarized as bench does, with
        the steps taken and the seconds the cost model priced them at (before --step-time-scale)."""
        offsets_s = gamma_send_offsets_s(len(self.trace), rate, self.args.cv, self.args.seed)
        records, run_stats = self._run(policy, slos, offsets_s, None, progress, **engine_flags)
        end_s = max((r.token_times_s[-1] for r in records if r.token_times_s), default=1e-9)
        return {**sweep_point(rate, records, end_s, slos), **run_stats}

    def slos(self, policy: str, **engine_flags) -> dict:
        """The explicit SLOs, or --slo-scale x the unloaded latency of `policy` alone on the simulated system."""
        if not self.args.slo_scale:
            return explicit_slos(self.args.ttft_slo, self.args.tbt_slo, self.args.tpot_slo)
        unloaded = unloaded_latency(lambda r: self.run(policy, None, [0.0], requests=[r], **engine_flags)[0],
                                    self.trace, self.args.num_slo_probes, self.args.probe_max_tokens)
        return slos_from_unloaded(unloaded, self.args.slo_scale)

    def sweep(self, policy: str, slos: dict, progress=None, **engine_flags) -> dict:
        """--rates (or --rate) in order, or with --bisect a sweep then bisection on the attainment (paper rule);
        the points sorted by rate and the effective throughput."""
        points: dict[float, dict] = {}

        def measure(rate: float) -> float:
            points[rate] = self.point(policy, slos, rate, progress, **engine_flags)
            return points[rate]["attainment"]

        rates = self.args.rates or [self.args.rate]
        if self.args.bisect:
            sweep_then_bisect(measure, rates, self.args.target, max_num_probes=self.args.max_probes)
        else:
            sweep_rates(measure, rates, self.args.target)
        ordered = [points[rate] for rate in sorted(points)]
        return {"points": ordered, "effective_throughput": effective_throughput(ordered, self.args.target)}

    def _run(self, policy: str, slos: dict | None, offsets_s: Sequence[float], requests, progress, **engine_flags,
             ) -> tuple[list[RequestRecord], dict]:
        """The records, and the steps taken, the seconds the cost model priced them at (before --step-time-scale),
        the preemptions, demotions and hidden admissions the schedulers chose and, with replicas, the requests each
        was sent."""
        args = engine_args(self.args, policy, self.config, self.cost_model, slos, **engine_flags)
        executors = []

        def executor(clock: SimClock, model: CostModel) -> CostModelExecutor:
            executors.append(CostModelExecutor(clock, model, step_overhead_s=self.args.step_overhead_s,
                                               step_time_scale=self.args.step_time_scale))
            return executors[-1]

        trace = self.trace if requests is None else requests
        replicas = [sim_engine(args, self.config, self.cost_model, make_executor=executor)
                    for _ in range(self.args.replicas)]
        stats = {}
        if self.args.replicas == 1:
            records = simulate(*replicas[0], trace, offsets_s, progress=progress,
                               request_latency_s=self.args.request_latency_s)
        else:
            records, stats["sent_per_replica"] = simulate_cluster(
                replicas, make_policy(self.args.router, self.args.seed, self.args.shed), trace, offsets_s,
                lambda r: RouteRequest(r.prompt_len, r.output_len, args.ttft_slo, args.tbt_slo),
                self.args.routing_stats_period_s, self.args.request_latency_s, progress)
        schedulers = [engine.scheduler for engine, _ in replicas]
        return records, {"num_steps": sum(e.num_steps for e in executors),
                         "priced_step_s": sum(e.priced_s for e in executors),
                         "num_preemptions": sum(s.num_preemptions for s in schedulers),
                         "num_demotions": sum(s.num_demotions for s in schedulers),
                         "hidden_admissions": sum(s.num_admissions["hidden"] for s in schedulers), **stats}


def load_sim_trace(args: argparse.Namespace) -> list[TraceRequest]:
    # OPT shapes share the default model's tokenizer (and a folder would mean building their weights).
    return load_cli_trace(args, tokenizer_path("default" if args.model in OPT_SHAPES else args.model, args.tokenizer))


def cmd_sim(args: argparse.Namespace) -> int:
    sim = Simulation.from_args(args)
    policies = (args.policies or args.scheduler).split(",")
    slos = sim.slos(policies[0])  # with --slo-scale, the first policy alone on the simulated system sets them
    # With --bisect the number of points is not known in advance: the bar counts the sweep's requests.
    num_rates = len(args.rates or [args.rate])
    servers = {}
    with tqdm(total=len(policies) * num_rates * len(sim.trace), unit="req", disable=args.no_progress) as progress:
        for policy in policies:
            servers[policy] = sim.sweep(policy, slos, progress)
    result = {"benchmark": "aptserve sim", "config": _config(args, sim.cost_model), "trace": trace_stats(sim.trace),
              "slo": slos, "baseline": policies[0], "servers": servers,
              "ratios": throughput_ratios(servers, policies[0]),
              "title": (f"simulated {args.model} on {_system(args)}: {args.dataset} x {len(sim.trace)} requests, cv "
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
