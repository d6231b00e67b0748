"""The FastAPI app over an engine: its routes, its errors, and the engine thread's lifetime."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI

from aptserve.core.client import ThreadCore
from aptserve.engine import LLMEngine
from aptserve.server.async_llm import AsyncLLM
from aptserve.server.errors import add_error_handlers
from aptserve.server.routes import router


@dataclass(frozen=True)
class ServerConfig:
    # Names a request's `model` may use; the first is the one reported. Empty: the engine's model name.
    served_model_names: tuple[str, ...] = ()
    max_queue_len: int = 1024
    log_step_stats: bool = False


def create_app(engine: LLMEngine | AsyncLLM, server_config: ServerConfig = ServerConfig()) -> FastAPI:
    """The app over a front end (its engine core in another process: `aptserve serve`) or over an engine
    built in this process (stepped by a thread of its own); the core starts and stops with the app."""
    if isinstance(engine, LLMEngine):
        engine = AsyncLLM(ThreadCore(engine.core), engine.tokenizer, server_config.max_queue_len,
                          server_config.log_step_stats)
    app = FastAPI(title="aptserve", description="OpenAI-compatible LLM serving", lifespan=_lifespan)
    app.state.engine = engine
    served_name = engine.config.model.served_name
    names = server_config.served_model_names or (served_name,)
    app.state.model_names = tuple(dict.fromkeys(names + (served_name,)))
    app.include_router(router)
    add_error_handlers(app)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.engine.start()
    try:
        yield
    finally:
        await app.state.engine.shutdown()
