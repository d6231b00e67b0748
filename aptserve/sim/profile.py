"""`aptserve profile`: time this engine's real steps over a grid (decode rows x contexts, prompt chunks, hidden-cache
decodes) and fit the simulator's linear cost model to them, so `aptserve sim --cost-model profile.json` prices
steps as this machine runs them; or fit it to a server's own steps, as it served them.

    aptserve profile --model default --out profile.json       # ~1 min on 2 cores
    aptserve profile --from-step-log steps.jsonl --out profile.json   # from `aptserve serve --step-log steps.jsonl`
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from aptserve.cache.manager import CacheManager
from aptserve.cache.tables import CacheKind
from aptserve.config import HybridMode
from aptserve.engine_args import EngineArgs, resolve
from aptserve.sampling import SamplingParams
from aptserve.sched.output import ScheduledRequest, SchedulerOutput
from aptserve.sched.step_cost import nonnegative_least_squares
from aptserve.sim.executor import LinearCostModel

GREEDY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
DECODE_ROWS = (1, 4, 16, 32)
CONTEXTS = (64, 256, 512, 1024)
PROMPT_CHUNKS = (32, 128, 256, 512)
HIDDEN_ROWS = (1, 8)


def grid(max_model_len: int, hybrid: bool) -> list[tuple[CacheKind, int, int, int]]:
    """(cache kind, rows, new tokens per row, start position) of each profiled step."""
    contexts = [c for c in CONTEXTS if c < max_model_len]
    points = [(CacheKind.KV, rows, 1, context - 1) for rows in DECODE_ROWS for context in contexts]
    points += [(CacheKind.KV, 1, chunk, start) for chunk in PROMPT_CHUNKS for start in (0, 256)
               if start + chunk <= max_model_len]
    if hybrid:
        points += [(CacheKind.HIDDEN, rows, 1, context - 1) for rows in HIDDEN_ROWS for context in contexts]
    return points


def time_step(runner, manager: CacheManager, point: tuple[CacheKind, int, int, int], repeats: int
              ) -> tuple[SchedulerOutput, float] | None:
    """The fastest of `repeats` runs of the step (after a warm-up); None if the pool cannot hold it."""
    kind, num_rows, num_tokens, start_pos = point
    scheduled = []
    try:
        for row in range(num_rows):
            request_id = f"profile-{row}"
            if not manager.allocate(request_id, kind, start_pos + num_tokens):
                return None
            scheduled.append(ScheduledRequest(request_id, [5] * num_tokens, start_pos, kind,
                                              manager.unit_ids(request_id), True, GREEDY))
        sched_out = SchedulerOutput(0, scheduled, scratch_unit_ids=manager.scratch_unit_ids)
        times = []
        for _ in range(repeats + 1):
            start_s = time.perf_counter()
            runner.execute(sched_out)
            times.append(time.perf_counter() - start_s)
        return sched_out, min(times[1:])
    finally:
        for row in range(num_rows):
            manager.free(f"profile-{row}")


def fit_linear(features: np.ndarray, seconds: np.ndarray) -> LinearCostModel:
    """Non-negative least squares of step seconds on LinearCostModel's features, relative to each step's time
    (small decode steps matter as much as long prompt chunks)."""
    weights = 1 / seconds
    coef = nonnegative_least_squares(features * weights[:, None], seconds * weights)
    return LinearCostModel(*map(float, np.zeros(features.shape[1]) if coef is None else coef))


def profile(args: EngineArgs, repeats: int = 3, progress: bool = True) -> dict:
    from aptserve.runner import ModelRunner

    config = resolve(args)
    runner = ModelRunner.from_config(config)
    manager = CacheManager.from_config(config.cache)
    points = grid(config.model.max_model_len, config.cache.hybrid != HybridMode.OFF)
    rows, skipped = [], []
    for point in tqdm(points, desc="profile", disable=not progress):
        timed = time_step(runner, manager, point, repeats)
        if timed is None:
            skipped.append(point)
            continue
        sched_out, seconds = timed
        rows.append({"kind": point[0].value, "rows": point[1], "tokens_per_row": point[2], "start_pos": point[3],
                     "features": sched_out.cost_features(), "seconds": seconds})
    features = np.array([r["features"] for r in rows], dtype=float)
    seconds = np.array([r["seconds"] for r in rows])
    model = fit_linear(features, seconds)
    predicted = np.array([model.step_time_of(f) for f in features])
    relative = np.abs(predicted - seconds) / seconds
    for row, estimate in zip(rows, predicted):
        row["predicted"] = float(estimate)
    return {"model": args.model, "dtype": config.dtype, "device": config.device, "block_size": config.cache.block_size,
            "coefficients": asdict(model), "fit_error": {"mean_relative": float(relative.mean()),
                                                         "max_relative": float(relative.max())},
            "points": rows, "skipped": [(k.value, *rest) for k, *rest in skipped]}


FORWARD_PHASES = ("prepare_s", "forward_s", "sample_s")  # what the cost model prices: the executor's call
OVERHEAD_PHASES = ("schedule_s", "update_s", "output_s", "gap_s")  # the rest of a served step


def profile_step_log(path: str, model: str) -> dict:
    """Fit the linear cost model to a served engine's own steps (`aptserve serve --step-log`): its forward seconds
    on the steps' features, as that server ran them (its other processes sharing the cores included). The per-step
    overhead beyond the forward pass is the median of the other phases (a mean would count idle gaps)."""
    steps = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    steps = [s for s in steps if s["num_requests"] > 0]
    if len(steps) < 8:
        raise SystemExit(f"{path}: {len(steps)} steps with requests; a fit needs at least 8")
    features = np.array([[1.0, s["num_decode_tokens"] + s["num_prefill_tokens"], s["num_context_tokens"],
                          s["num_recompute_tokens"]] for s in steps])
    seconds = np.array([sum(s[phase] for phase in FORWARD_PHASES) for s in steps])
    cost_model = fit_linear(features, seconds)
    relative = np.abs(np.array([cost_model.step_time_of(f) for f in features]) - seconds) / seconds
    return {"model": model, "source": f"step log {Path(path).name}", "num_steps": len(steps),
            "coefficients": asdict(cost_model), "fit_error": {"mean_relative": float(relative.mean()),
                                                              "max_relative": float(relative.max())},
            "step_overhead_s": float(np.median([sum(s[phase] for phase in OVERHEAD_PHASES) for s in steps]))}


def load_profile(path: str) -> LinearCostModel:
    return LinearCostModel(**json.loads(Path(path).read_text())["coefficients"])


def add_profile_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("profile", help="time this engine's steps over a grid and fit the simulator's cost model",
                            description=__doc__.split("\n\n")[0])
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--from-step-log", default=None, metavar="JSONL",
                        help="fit to a server's own steps (`aptserve serve --step-log`) instead of timing a grid")
    parser.add_argument("--out", default="profile.json")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    if args.from_step_log:
        result = profile_step_log(args.from_step_log, args.model)
    else:
        result = profile(EngineArgs.from_cli_args(args), args.repeats, progress=not args.no_progress)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"coefficients {result['coefficients']}; fit error {result['fit_error']}; wrote {args.out}")
    return 0
