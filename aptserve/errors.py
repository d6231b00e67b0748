"""Typed errors that say what to change. The server maps InvalidRequestError to HTTP 400."""


class AptServeError(Exception):
    """Base class of the engine's own errors."""


class InvalidRequestError(AptServeError, ValueError):
    """The request cannot be served as given (bad parameters, too long, never fits the cache)."""


class UnknownModelError(AptServeError, ValueError):
    """The model name is neither a known alias nor a local HF folder."""


class EngineOverloadedError(AptServeError):
    """The queue is full; the client should retry later (HTTP 503)."""


class RequestShedError(EngineOverloadedError):
    """A cluster's router predicts that no replica can serve this request within its SLOs (--shed; HTTP 503)."""


class ConversionFailedError(AptServeError):
    """The executor could not move these requests' cache to another kind; their cached rows are lost."""

    def __init__(self, request_ids: list[str]) -> None:
        super().__init__(f"cache conversion failed for {len(request_ids)} requests")
        self.request_ids = request_ids
