"""genq's API errors, one type per meaning, each rendered as an OpenAI error body by one handler."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Base of every error the API turns into {"error": {"message", "type", "param", "code"}}."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.extra = extra or {}  # more fields inside "error", e.g. "line" and "errors"

    def body(self) -> dict[str, Any]:
        """The OpenAI-style JSON body."""
        error = {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}
        return {"error": error | self.extra}


class InvalidRequest(ApiError):
    """400: the request (or the file it names) is malformed or asks for something unsupported."""

    status_code = 400
    error_type = "invalid_request_error"


class Authentication(ApiError):
    """401: no API key, or one that is unknown or revoked."""

    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFound(ApiError):
    """404: no such object for this tenant (another tenant's object is not found either)."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class Conflict(ApiError):
    """409: the request contradicts the object's state (idempotency key reuse, finished batch)."""

    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(ApiError):
    """413: an upload larger than settings.max_file_bytes."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "file_too_large"


class ServiceUnavailable(ApiError):
    """503: a dependency (database, storage) cannot be reached."""

    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"
