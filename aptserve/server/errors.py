"""OpenAI-style errors: every refusal is `{"error": {"message", "type", "param", "code"}}`.

400 for what the client must change (never FastAPI's 422), 503 when the queue is full or the server drains,
500 only when the engine fails a request.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from aptserve.errors import AptServeError, EngineOverloadedError, InvalidRequestError
from aptserve.server.async_llm import EngineDeadError, RequestFailedError, ServerDrainingError
from aptserve.server.protocol import ErrorResponse


class APIError(Exception):
    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message = status_code, message
        self.type, self.param, self.code = type, param, code


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(AptServeError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)


def error_response(status_code: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse.of(message, type, param, code).model_dump()
    return JSONResponse(body, status_code=status_code, headers=headers)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status_code, exc.message, exc.type, exc.param, exc.code)


async def _engine_error(raw_request: Request, exc: AptServeError) -> JSONResponse:
    if isinstance(exc, InvalidRequestError):
        return error_response(400, str(exc))
    if isinstance(exc, EngineOverloadedError):
        code = ("server_shutting_down" if isinstance(exc, ServerDrainingError)
                else "engine_dead" if isinstance(exc, EngineDeadError) else "server_overloaded")
        raw_request.app.state.engine.metrics.requests_rejected.labels(code).inc()
        return error_response(503, str(exc), "server_error", code=code, headers={"Retry-After": "1"})
    code = "request_failed" if isinstance(exc, RequestFailedError) else None
    return error_response(500, str(exc), "server_error", code=code)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI would answer 422; OpenAI clients expect 400 naming the offending field."""
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", "")
        return error_response(400, f"the request body is not valid JSON: {detail}")
    messages = []
    for error in errors[:3]:
        loc = ".".join(str(part) for part in error["loc"][1:]) or "request body"
        messages.append(f"{loc}: {error['msg']}")
    param = str(errors[0]["loc"][1]) if errors and len(errors[0]["loc"]) > 1 else None
    return error_response(400, "; ".join(messages) or "invalid request", param=param)


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(exc.status_code, str(exc.detail), type, headers=exc.headers)


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error")
