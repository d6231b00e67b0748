"""OpenAI-compatible HTTP server over an async front of the engine."""
from aptserve.server.api_server import DrainingServer, ServerConfig, build_server, create_app
from aptserve.server.async_engine import AsyncLLMEngine, RequestFailedError, RequestStream

__all__ = ["AsyncLLMEngine", "DrainingServer", "RequestFailedError", "RequestStream", "ServerConfig",
           "build_server", "create_app"]
