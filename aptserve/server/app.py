"""The FastAPI app over an engine: its routes, its errors, and the engine thread's lifetime."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI

from aptserve.engine import LLMEngine
from aptserve.server.async_engine import AsyncLLMEngine
from aptserve.server.errors import add_error_handlers
from aptserve.server.routes import router


@dataclass(frozen=True)
class ServerConfig:
    # Names a request's `model` may use; the first is the one reported. Empty: the engine's model name.
    served_model_names: tuple[str, ...] = ()
    max_queue_len: int = 1024


def create_app(engine: LLMEngine, server_config: ServerConfig = ServerConfig()) -> FastAPI:
    """The app over an engine; the engine's thread starts and stops with the app."""
    app = FastAPI(title="aptserve", description="OpenAI-compatible LLM serving", lifespan=_lifespan)
    app.state.engine = AsyncLLMEngine(engine, server_config.max_queue_len)
    names = server_config.served_model_names or (engine.config.model.served_name,)
    app.state.model_names = tuple(dict.fromkeys(names + (engine.config.model.served_name,)))
    app.include_router(router)
    add_error_handlers(app)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.engine.start()
    try:
        yield
    finally:
        await asyncio.to_thread(app.state.engine.shutdown)
