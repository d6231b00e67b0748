"""The FastAPI app over an engine: its guards, routes and errors, and the engine core's lifetime."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from aptserve.server.args import ServerArgs
from aptserve.server.engine_client import EngineClient
from aptserve.server.errors import add_error_handlers
from aptserve.server.guards import APIKeyCheck, BodySizeLimit
from aptserve.server.routes import router
from aptserve.server.tokenize_routes import router as tokenize_router


def create_app(engine: EngineClient, server_args: ServerArgs = ServerArgs()) -> FastAPI:
    """The app over a front end (AsyncLLM over one engine core, or the cluster's ClusterEngine); the engine starts
    and stops with the app."""
    docs = {} if not server_args.disable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="aptserve", description="OpenAI-compatible LLM serving", lifespan=_lifespan, **docs)
    app.state.engine = engine
    served_name = engine.config.model.served_name
    names = server_args.served_model_name or (served_name,)
    app.state.model_names = tuple(dict.fromkeys(names + (served_name,)))
    app.include_router(router)
    app.include_router(tokenize_router)
    add_error_handlers(app)
    # Added innermost first: the body limit runs before anything reads a body, the key check before that, CORS
    # outermost so that its preflights and headers also reach clients the key check turns away.
    app.add_middleware(BodySizeLimit, max_bytes=server_args.max_request_body_bytes)
    if server_args.api_key:
        app.add_middleware(APIKeyCheck, api_key=server_args.api_key,
                           protect_health_and_metrics=server_args.protect_health_and_metrics)
    if server_args.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(server_args.allowed_origins),
                           allow_methods=list(server_args.allowed_methods),
                           allow_headers=list(server_args.allowed_headers),
                           allow_credentials=server_args.allow_credentials)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.engine.start()
    try:
        yield
    finally:
        await app.state.engine.shutdown()
