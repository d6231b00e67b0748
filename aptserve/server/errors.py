"""OpenAI-style errors: every refusal is `{"error": {"message", "type", "param", "code"}}`.

400 for what the client must change (never FastAPI's 422), 503 when the queue is full or the server drains,
500 only when the engine fails a request.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from aptserve.errors import AptServeError, EngineOverloadedError, InvalidRequestError, RequestShedError
from aptserve.server.async_llm import (EngineDeadError, RequestCutError, RequestFailedError,
                                      ServerDrainingError)
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


def engine_error(exc: AptServeError) -> tuple[int, str, str | None]:
    """The HTTP status, error type and code of an engine error (one table for answers and stream events)."""
    if isinstance(exc, InvalidRequestError):
        return 400, "invalid_request_error", None
    if isinstance(exc, RequestCutError):  # another replica may serve it
        return 503, "server_error", "server_shutting_down"
    if isinstance(exc, EngineOverloadedError):
        return 503, "server_error", ("server_shutting_down" if isinstance(exc, ServerDrainingError)
                                     else "engine_dead" if isinstance(exc, EngineDeadError)
                                     else "request_shed" if isinstance(exc, RequestShedError)
                                     else "server_overloaded")
    return 500, "server_error", "request_failed" if isinstance(exc, RequestFailedError) else None


async def _engine_error(raw_request: Request, exc: AptServeError) -> JSONResponse:
    status_code, type, code = engine_error(exc)
    if isinstance(exc, EngineOverloadedError):
        raw_request.app.state.engine.metrics.requests_rejected.labels(code).inc()
    headers = {"Retry-After": "1"} if status_code == 503 else None
    return error_response(status_code, str(exc), type, code=code, headers=headers)


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
    code = "request_too_large" if exc.status_code == 413 else None
    return error_response(exc.status_code, str(exc.detail), type, code=code, headers=exc.headers)


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error")
