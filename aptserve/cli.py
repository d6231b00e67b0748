"""`aptserve serve | generate | bench`: vLLM's flag names where they exist."""
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
    EngineArgs.add_cli_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--served-model-name", nargs="+", default=None,
                       help="names requests may use for the model (the first is reported); default: --model")
    group.add_argument("--max-queue-len", type=int, default=1024,
                       help="most requests that may wait for the engine; beyond it new ones get HTTP 503")
    group.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds to let running requests finish before exiting")
    group.add_argument("--disable-uvicorn-access-log", action="store_true")
    group.add_argument("--log-step-stats", action="store_true",
                       help="log where each engine step's time went (schedule, prepare, forward, sample, update, "
                            "output, gap); the same figures are on /metrics as aptserve:step_phase_seconds")
    group.add_argument("--engine-in-thread", action="store_true",
                       help="step the engine core in a thread of the server's process instead of a process of its "
                            "own (for measuring what the split buys; slower under load)")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve with the engine core in a process of its own; exits 1 if that process dies."""
    from aptserve.core.client import ProcessCore, ThreadCore
    from aptserve.registry import load_tokenizer
    from aptserve.server import AsyncLLM, ServerConfig, build_server, create_app

    if args.max_queue_len < 1:
        raise SystemExit("--max-queue-len must be >= 1")
    server_config = ServerConfig(served_model_names=tuple(args.served_model_name or ()),
                                 max_queue_len=args.max_queue_len, log_step_stats=args.log_step_stats)
    engine_args = EngineArgs.from_cli_args(args)
    if args.engine_in_thread:
        from aptserve.engine import LLMEngine

        llm_engine = LLMEngine.from_engine_args(engine_args)
        core, tokenizer = ThreadCore(llm_engine.core), llm_engine.tokenizer
    else:
        core = ProcessCore.launch(engine_args, log_level=logging.getLogger().level)
        tokenizer = load_tokenizer(core.config.model.path)
    engine = AsyncLLM(core, tokenizer, args.max_queue_len, args.log_step_stats)
    build_server(create_app(engine, server_config), args.host, args.port, args.shutdown_timeout,
                 access_log=not args.disable_uvicorn_access_log).run()
    if engine.dead_reason is not None:
        print(f"error: {engine.dead_reason}", file=sys.stderr)
        return 1
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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from aptserve.errors import AptServeError

    try:
        return args.func(args)
    except AptServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
