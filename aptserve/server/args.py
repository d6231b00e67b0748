"""The server's flags, declared once (CLI options and `ServerArgs(...)` in Python): names as vLLM's where vLLM
has the flag. Uvicorn-level limits (connections, timeouts) go to build_server; the rest to create_app."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from aptserve.flags import FlagTable, check_positive, flag, parse_bytes

API_KEY_ENV = "APTSERVE_API_KEY"


@dataclass(frozen=True)
class ServerArgs(FlagTable):
    cli_group: ClassVar[str] = "server"

    host: str = flag("127.0.0.1", "address to listen on")
    port: int = flag(8000, "port to listen on", int)
    served_model_name: tuple[str, ...] = flag(
        (), "names requests may use for the model (the first is reported); default: --model", nargs="+")
    max_queue_len: int = flag(1024, "most requests that may wait for the engine; beyond it new ones get HTTP 503",
                              int)
    shutdown_timeout: float = flag(30.0, "on SIGTERM, seconds to let running requests finish; then each open one "
                                   "gets an error (streams: an error event and [DONE]) and the exit status is 3",
                                   float)
    api_key: str | None = flag(None, f"require 'Authorization: Bearer KEY' on every route but /health, /metrics "
                               f"and the docs (default: the {API_KEY_ENV} environment variable; none: open)")
    protect_health_and_metrics: bool = flag(False, "with --api-key, require it on /health and /metrics too",
                                            action="store_true")
    disable_docs: bool = flag(False, "serve no /docs, /redoc and /openapi.json", action="store_true")
    allowed_origins: tuple[str, ...] = flag((), "CORS: origins browsers may call from (e.g. '*'); default: none "
                                            "(same origin only)", nargs="+")
    allowed_methods: tuple[str, ...] = flag(("*",), "CORS: allowed methods", nargs="+")
    allowed_headers: tuple[str, ...] = flag(("*",), "CORS: allowed headers", nargs="+")
    allow_credentials: bool = flag(False, "CORS: allow credentials", action="store_true")
    max_request_body_bytes: int = flag(8 << 20, "largest request body (bytes; 512K, 8M also work); larger ones "
                                       "get HTTP 413 before they are read", parse_bytes)
    limit_concurrency: int = flag(4096, "most open connections and requests; beyond it new ones get HTTP 503", int)
    timeout_keep_alive: float = flag(5.0, "seconds an idle keep-alive connection stays open", float)
    header_read_timeout: float = flag(10.0, "seconds a connection may take to send a request's headers (from "
                                      "when it opens, or its previous response ends) before it is closed", float)
    disable_uvicorn_access_log: bool = flag(False, "no access log line per request", action="store_true")
    log_step_stats: bool = flag(False, "log where each engine step's time went (schedule, prepare, forward, sample, "
                                "update, output, gap); the same figures are on /metrics as "
                                "aptserve:step_phase_seconds", action="store_true")
    step_log: str | None = flag(None, "append one JSON line per engine step to this file: its phases (as "
                                "--log-step-stats) and what it held (requests, decode and prefill tokens, context and "
                                "recompute tokens); `aptserve profile --from-step-log` fits the simulator to it")
    engine_in_thread: bool = flag(False, "step the engine core in a thread of the server's process instead of a "
                                  "process of its own (for measuring what the split buys; slower under load)",
                                  action="store_true")

    def __post_init__(self) -> None:
        if self.api_key is None and os.environ.get(API_KEY_ENV):
            object.__setattr__(self, "api_key", os.environ[API_KEY_ENV])
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        check_positive({"max_queue_len": self.max_queue_len, "max_request_body_bytes": self.max_request_body_bytes,
                        "limit_concurrency": self.limit_concurrency})
