"""OpenAI-compatible HTTP server over an async front of the engine."""
from aptserve.server.app import create_app
from aptserve.server.args import ServerArgs
from aptserve.server.async_llm import AsyncLLM, RequestFailedError, RequestStream
from aptserve.server.uvicorn_server import DrainingServer, build_server

__all__ = ["AsyncLLM", "DrainingServer", "RequestFailedError", "RequestStream", "ServerArgs", "build_server",
           "create_app"]
