"""`aptserve serve | generate | bench | sim`: vLLM's flag names where they exist."""
from __future__ import annotations

import argparse
import logging
import re
import sys

from aptserve.config import HYBRID_CACHE_MODES, SCHEDULERS

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_bytes(text: str) -> int:
    """'1073741824', '512M', '1G', '1.5GiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgKMG]?)(i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (use e.g. 1073741824, 512M or 1G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default="default",
                       help="'default' (SmolLM2-135M-Instruct), an OPT shape such as 'opt-125m', or an HF folder")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--device", default="cpu")
    group.add_argument("--kv-cache-memory", type=parse_bytes, default=1 << 30,
                       help="cache pool size in bytes (like vLLM's kv_cache_memory_bytes); 1G, 512M also work")
    group.add_argument("--scheduler", default="fcfs", choices=SCHEDULERS)
    group.add_argument("--hybrid-cache", default="auto", choices=HYBRID_CACHE_MODES)
    group.add_argument("--max-num-seqs", type=int, default=256)
    group.add_argument("--max-num-batched-tokens", type=int, default=None)
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--alpha", type=float, default=None,
                       help="seconds to re-project one block's K/V across all layers (the hidden cache's "
                            "price in the apt policies); default: measured at start-up")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(model=args.model, dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
                scheduler=args.scheduler, hybrid_cache=args.hybrid_cache, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                block_size=args.block_size, seed=args.seed, alpha=args.alpha)


def cmd_generate(args: argparse.Namespace) -> int:
    from aptserve import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
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
    add_engine_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--served-model-name", nargs="+", default=None,
                       help="names requests may use for the model (the first is reported); default: --model")
    group.add_argument("--max-queue-len", type=int, default=1024,
                       help="most requests that may wait for the engine; beyond it new ones get HTTP 503")
    group.add_argument("--ttft-slo", type=float, default=1.0,
                       help="default time-to-first-token SLO (s) of requests without a `ttft_slo` field")
    group.add_argument("--tbt-slo", type=float, default=1.0,
                       help="default time-between-tokens SLO (s) of requests without a `tbt_slo` field")
    group.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds to let running requests finish before exiting")
    group.add_argument("--disable-uvicorn-access-log", action="store_true")


def cmd_serve(args: argparse.Namespace) -> int:
    from aptserve import LLM
    from aptserve.server import ServerConfig, build_server, create_app

    if args.max_queue_len < 1:
        raise SystemExit("--max-queue-len must be >= 1")
    # LLM maps the engine flags onto EngineConfig exactly as `generate` does; the server takes its engine.
    engine = LLM(**engine_kwargs(args), ttft_slo=args.ttft_slo, tbt_slo=args.tbt_slo).engine
    server_config = ServerConfig(served_model_names=tuple(args.served_model_name or ()),
                                 max_queue_len=args.max_queue_len)
    app = create_app(engine, server_config)
    build_server(app, args.host, args.port, args.shutdown_timeout,
                 access_log=not args.disable_uvicorn_access_log).run()
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
    add_engine_args(gen)
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
