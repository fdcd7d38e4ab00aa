"""Errors the client can act on, each with its HTTP status and OpenAI error type."""

from __future__ import annotations


class PipelineError(Exception):
    status = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


class HTTPStatusError(PipelineError):
    """A status the web framework decided (an unknown path: 404, a wrong method: 405)."""

    type = "invalid_request_error"

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BadRequest(PipelineError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(PipelineError):
    status = 401
    type = "authentication_error"


class ModelNotFound(PipelineError):
    status = 404
    type = "invalid_request_error"


class PayloadTooLarge(PipelineError):
    status = 413
    type = "invalid_request_error"


class OutputInvalid(PipelineError):
    """No answer satisfying the constraint could be produced within the repair budget."""

    status = 422
    type = "invalid_response_error"


class Overloaded(PipelineError):
    status = 429
    type = "rate_limit_error"


class Unavailable(PipelineError):
    status = 503
    type = "service_unavailable"


class DeadlineExceeded(PipelineError):
    status = 504
    type = "timeout_error"
