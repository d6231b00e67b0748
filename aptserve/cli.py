"""`aptserve serve | generate | bench | sim | profile`: vLLM's flag names where they exist.

Missing or wrong flags end every subcommand the same way: one line, `error: ...`, and exit status 2 (argparse's
usage errors too), never a traceback."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from aptserve.engine_args import EngineArgs


def cmd_generate(args: argparse.Namespace) -> int:
    from aptserve import LLM, SamplingParams

    llm = LLM(**dataclasses.asdict(EngineArgs.from_cli_args(args)))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sampling_seed)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    tokenizer = llm.get_tokenizer()
    use_chat = not args.no_chat_template and getattr(tokenizer, "chat_template", None)
    if use_chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for output in outputs:
        print(output.outputs[0].text.strip())
    return 0


# --- `aptserve serve`: the OpenAI-compatible server (owned with aptserve/server/) -------------------
def add_serve_args(parser: argparse.ArgumentParser) -> None:
    from aptserve.cluster.args import ClusterArgs
    from aptserve.server.args import ServerArgs

    EngineArgs.add_cli_args(parser)
    ServerArgs.add_cli_args(parser)
    ClusterArgs.add_cli_args(parser)


# Exit statuses of `aptserve serve` beyond 0 (drained cleanly) and 2 (bad flags).
EXIT_ENGINE_DIED = 1
EXIT_REQUESTS_CUT = 3


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve with the engine core in a process of its own (or, with --replicas N > 1, N engine replicas on Ray
    Serve behind this process's API); exits 1 if the engine dies, 3 if the drain had to cut requests."""
    from aptserve.cluster.args import ClusterArgs
    from aptserve.engine_args import check_flags
    from aptserve.server import AsyncLLM, ServerArgs, build_server, create_app

    server_args, cluster_args = ServerArgs.from_cli_args(args), ClusterArgs.from_cli_args(args)
    engine_args = EngineArgs.from_cli_args(args)
    check_flags(engine_args)  # here, not after the engine-core process has started and loaded the weights
    if cluster_args.replicas > 1:
        try:
            from aptserve.cluster.ray_app import start_cluster
        except ImportError as exc:
            raise SystemExit(f"error: --replicas {cluster_args.replicas} needs Ray Serve: pip install "
                             f"'aptserve[cluster]' ({exc})") from exc
        engine = start_cluster(engine_args, server_args, cluster_args)
    else:
        engine = AsyncLLM.launch(engine_args, server_args)
    server = build_server(create_app(engine, server_args), server_args.host, server_args.port,
                          server_args.shutdown_timeout, access_log=not server_args.disable_uvicorn_access_log,
                          limit_concurrency=server_args.limit_concurrency,
                          timeout_keep_alive=server_args.timeout_keep_alive,
                          header_read_timeout=server_args.header_read_timeout)
    server.run()
    if engine.dead_reason is not None:
        print(f"error: {engine.dead_reason}", file=sys.stderr)
        return EXIT_ENGINE_DIED
    if server.num_cut:
        print(f"error: the shutdown timeout cut {server.num_cut} unfinished requests", file=sys.stderr)
        return EXIT_REQUESTS_CUT
    return 0


# --- `aptserve bench`: the serving benchmark client (owned with aptserve/bench/) -----------------
def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from aptserve.bench.cli import add_bench_subcommands

    bench = sub.add_parser("bench", help="SLO attainment and effective throughput of OpenAI-compatible servers")
    add_bench_subcommands(bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aptserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text offline for one or more prompts")
    EngineArgs.add_cli_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable); stdin lines otherwise")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--no-chat-template", action="store_true",
                     help="send the prompt as raw text instead of a chat turn")
    gen.set_defaults(func=cmd_generate)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    add_bench_parser(sub)
    from aptserve.sim.cli import add_sim_parser
    from aptserve.sim.profile import add_profile_parser

    add_sim_parser(sub)
    add_profile_parser(sub)
    return parser


EXIT_BAD_FLAGS = 2  # argparse's own


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from aptserve.errors import AptServeError

    try:
        return args.func(args)
    except SystemExit as exc:  # a subcommand's own check of its flags: SystemExit("what to change")
        if not isinstance(exc.code, str):
            raise
        return _bad_flags(exc.code.removeprefix("error: "))
    except AptServeError as exc:
        return _bad_flags(str(exc))
    # What a wrong value or path fails with past the checks (a file that is not there, a value out of range).
    except (ValueError, OSError) as exc:
        return _bad_flags(f"{type(exc).__name__}: {exc}")


def _bad_flags(message: str) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)  # one line
    return EXIT_BAD_FLAGS


if __name__ == "__main__":
    sys.exit(main())
