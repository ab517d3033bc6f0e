"""ASGI middleware that refuses, with a 400, client text no route could store or answer safely.

Checked before any route runs, so a route added later is covered too:
- the path and every query key and value: UTF-8, no control character (a NUL in an id reached
  PostgreSQL, which cannot hold one, and came back as a 500);
- a JSON body (application/json, */*+json, or no Content-Type): at most MAX_JSON_BODY_BYTES, and
  no NUL, lone surrogate escape or nesting beyond genq.json_guard's depth anywhere in it.
Uploads (multipart) are streamed and checked by api/uploads.py instead.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, InvalidRequest, PayloadTooLarge
from genq.json_guard import has_control_character, json_problem

MAX_JSON_BODY_BYTES = 1 << 20  # a create request is a few hundred bytes; metadata is capped far below this


class InputGuard:
    """Wraps the app; see the module docstring for what it refuses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = _url_error(scope)
        if error is None and _is_json(scope):
            body, error = await _read_json_body(receive)
            if error is None:
                receive = _replay(body, receive)
        if error is not None:
            await JSONResponse(error.body(), status_code=error.status_code)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _url_error(scope: Scope) -> ApiError | None:
    try:
        path = unquote_to_bytes(scope.get("raw_path") or scope["path"].encode()).decode("utf-8")
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True,
                          encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        return InvalidRequest("The URL is not UTF-8 text.", code="invalid_value")
    if has_control_character(path):
        return InvalidRequest("The URL path holds a control character.", code="invalid_value")
    for key, value in query:
        if has_control_character(key) or has_control_character(value):
            return InvalidRequest(f"Query parameter {key!r} holds a control character.", param=key,
                                  code="invalid_value")
    return None


def _is_json(scope: Scope) -> bool:
    """Whether FastAPI would read the body as JSON: no Content-Type, application/json or */*+json."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            kind = value.split(b";")[0].strip().lower()
            return kind == b"application/json" or kind.endswith(b"+json")
    return scope.get("method") in ("POST", "PUT", "PATCH")


async def _read_json_body(receive: Receive) -> tuple[bytes, ApiError | None]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_JSON_BODY_BYTES:
            return b"", PayloadTooLarge(f"A JSON request body may be at most {MAX_JSON_BODY_BYTES} bytes.",
                                        code="request_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    try:
        parsed: Any = json.loads(body)
    except RecursionError:
        return body, InvalidRequest("The request body nests JSON too deeply.", code="invalid_value")
    except ValueError:
        return body, None  # not JSON at all: the route's own validation says so, in its words
    problem = json_problem(parsed)
    if problem is not None:
        return body, InvalidRequest(f"The request body {problem}.", code="invalid_value")
    return body, None


def _replay(body: bytes, original: Receive) -> Receive:
    """A receive() that hands the already-read body to the app, then is the real one (a disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive
