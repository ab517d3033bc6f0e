"""genq's API errors, one type per meaning, each rendered as an OpenAI error body by one handler."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from storage.errors import StorageError, StorageKeyNotFound

log = logging.getLogger(__name__)


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


def no_such(kind: str, object_id: str, *, param: str) -> NotFound:
    """404 for an id the tenant does not own, worded like OpenAI's "No such File object: file-abc"."""
    return NotFound(f"No such {kind}: {object_id}", param=param)


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


class RateLimited(ApiError):
    """429: a per-key rate limit or a per-tenant queue cap; retry_after seconds go in the header."""

    status_code = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None, error_type: str = "requests",
                 retry: bool = True) -> None:
        super().__init__(message, code=code)
        self.error_type = error_type
        self.headers = {"retry-after": str(retry_after)}
        if not retry:  # a queue cap frees up as batches finish, not within the SDK's retries
            self.headers["x-should-retry"] = "false"


class ServiceUnavailable(ApiError):
    """503: a dependency (database, storage) cannot be reached."""

    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


def _response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    if error.status_code == 409:  # the SDK retries 409; a state conflict will not resolve itself
        headers = (headers or {}) | {"x-should-retry": "false"}
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)


def _validation_error(exc: RequestValidationError) -> InvalidRequest:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.", code="invalid_json")
    if param is None:  # the body itself is missing or not a JSON object
        return InvalidRequest("The request body must be a JSON object.", code="invalid_value")
    if first.get("type") == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param,
                              code="missing_required_parameter")
    return InvalidRequest(f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param=param,
                          code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Renders every error as an OpenAI body: genq errors, FastAPI validation (400, never 422),
    unknown routes, unreachable dependencies (503) and, last, anything unexpected (500, no traceback)."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _response(exc, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = InvalidRequest(str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        error.status_code = exc.status_code  # 404 unknown route, 405 wrong method, ...
        return _response(error, headers=getattr(exc, "headers", None))

    @app.exception_handler(StorageKeyNotFound)
    async def missing_bytes(_request: Request, exc: StorageKeyNotFound) -> JSONResponse:
        log.error("storage is missing an object the database names: %s", exc)
        return _response(NotFound("The object's content is no longer in storage.", code="content_missing"))

    @app.exception_handler(StorageError)
    async def storage_down(_request: Request, exc: StorageError) -> JSONResponse:
        log.error("storage error: %s", exc)
        return _response(ServiceUnavailable("Storage is unavailable; retry later."))

    @app.exception_handler(OperationalError)
    async def database_down(_request: Request, exc: OperationalError) -> JSONResponse:
        log.error("database error: %s", exc)
        return _response(ServiceUnavailable("The database is unavailable; retry later."))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return _response(ApiError("The server had an error while processing your request.", code="internal_error"))
