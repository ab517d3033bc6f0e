"""Validates a batch input file while streaming it from storage, then writes its per-model shards.

Every line is checked (JSON, custom_id/method/url/body, endpoint, model, and the body by
workers.batches.request_contract, the rules the worker applies too) before anything is written to storage;
errors carry OpenAI codes and the 1-based line number. Valid requests are grouped per model into
shards of settings.shard_size lines, stored as JSONL {"line": n, "custom_id": ..., "body": {...}}
at batches/{batch_id}/shards/{index:05d}.jsonl.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from api.errors import InvalidRequest
from genq.json_guard import MAX_JSON_DEPTH, has_control_character, json_problem
from genq.settings import Settings
from storage import Store
from storage.keys import shard_key
from workers.batches.image_contract import IMAGES_ENDPOINT, check_against_card, parse_image_body
from workers.batches.request_contract import RequestError, parse_body
from workers.registry import image_cards as registry_image_cards
from workers.registry import list_models

MAX_REPORTED_ERRORS = 20  # errors listed in error.errors.data; the first is the headline
MAX_CUSTOM_ID_CHARS = 512  # request_results.custom_id
MAX_LINE_BYTES = 32 << 20  # longest request line read into memory


@dataclass(frozen=True)
class LineError:
    """One problem in the input file, as an OpenAI BatchError {code, message, param, line}."""

    code: str  # OpenAI-style: invalid_json_line, missing_required_parameter, model_not_found, ...
    message: str  # names the line, e.g. "Line 3: body.temperature must be between 0 and 2"
    param: str | None  # the offending field ("custom_id", "body.max_tokens"), None for whole-file errors
    line: int | None  # 1-based line number in the input file

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


class BatchInputInvalid(InvalidRequest):
    """400 for an input file that failed validation; `errors` lists up to MAX_REPORTED_ERRORS problems."""

    def __init__(self, errors: list[LineError]) -> None:
        first = errors[0]
        more = f" ({len(errors) - 1} more error(s) in error.errors)" if len(errors) > 1 else ""
        listed = {"object": "list", "data": [e.as_dict() for e in errors]}
        super().__init__(first.message + more, param=first.param, code=first.code,
                         extra={"line": first.line, "errors": listed})
        self.errors = errors


@dataclass(frozen=True)
class ShardPlan:
    """A shard written to storage, ready to become a Shard row."""

    index: int  # 0-based, unique within the batch
    model: str  # every request in the shard names this model
    input_key: str  # storage key of its JSONL lines
    request_count: int  # lines in the shard
    requested_tokens: int  # the most its requests may generate (max_tokens, or the default)


@dataclass(frozen=True)
class ValidatedInput:
    """What a valid input file contained, after its shards were written."""

    total: int  # requests (non-blank lines)
    shards: list[ShardPlan]  # in index order

    @property
    def requested_tokens(self) -> int:
        return sum(shard.requested_tokens for shard in self.shards)

    @property
    def models(self) -> list[str]:
        """The models named in the file, in order of first appearance (a model's first shard comes first)."""
        return list(dict.fromkeys(shard.model for shard in self.shards))


def validate_and_shard(*, store: Store, settings: Settings, input_key: str, endpoint: str,
                       batch_id: str, context_lengths: dict[str, int] | None = None,
                       image_cards: dict[str, dict[str, Any] | None] | None = None) -> ValidatedInput:
    """Validates the file at input_key for endpoint and writes its shards; raises BatchInputInvalid first.

    context_lengths: the models lines may name (the tenant's, fine-tuned ones included) -> their context;
    image_cards: which of them are image models -> their cards (registry.image_cards); default: the
    deployment's base models."""
    with tempfile.TemporaryDirectory(prefix="genq-shards-") as spool, store.open_stream(input_key) as stream:
        writer = _ShardSpool(Path(spool), settings.shard_size)
        try:
            total = _validate_lines(stream, settings=settings, endpoint=endpoint, writer=writer,
                                    context_lengths=context_lengths, image_cards=image_cards)
            shards = writer.upload(store=store, batch_id=batch_id)
        finally:
            writer.close_all()
        return ValidatedInput(total=total, shards=shards)


def _validate_lines(stream: BinaryIO, *, settings: Settings, endpoint: str, writer: _ShardSpool,
                    context_lengths: dict[str, int] | None = None,
                    image_cards: dict[str, dict[str, Any] | None] | None = None) -> int:
    """Checks every line, spooling valid ones; returns the request count or raises BatchInputInvalid."""
    errors: list[LineError] = []
    seen_ids: set[str] = set()
    if context_lengths is None:  # read once, not per line
        bases = list_models(settings)
        context_lengths = {spec.id: spec.context_length for spec in bases}
        image_cards = registry_image_cards(bases)
    models = _Models(context_lengths, image_cards or {})
    total = 0
    for number, raw in enumerate(iter(lambda: stream.readline(MAX_LINE_BYTES + 1), b""), start=1):
        if len(raw) > MAX_LINE_BYTES:  # one request this big is a mistake (a JSON array, a binary file)
            errors.append(LineError("line_too_long", f"Line {number}: is longer than {MAX_LINE_BYTES} bytes; "
                                    "the input file must be JSONL, one request per line", None, number))
            break
        if not raw.strip():
            continue  # blank lines (a trailing newline) are not requests
        total += 1
        if total > settings.max_batch_requests:
            errors.append(LineError("too_many_requests", f"Line {number}: the file has more than "
                                    f"{settings.max_batch_requests} requests, the most one batch may hold",
                                    None, number))
            break
        checked = _check_line(raw, number, endpoint=endpoint, models=models, seen_ids=seen_ids)
        if isinstance(checked, LineError):
            errors.append(checked)
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
        elif not errors:
            body = checked["body"]
            explicit = body.get("max_completion_tokens") or body.get("max_tokens")
            writer.add(number, checked, explicit or min(settings.default_max_tokens, context_lengths[body["model"]]))
            # (an image model's context length is 0: its lines reserve no tokens)
    if not errors and total == 0:
        errors.append(LineError("empty_file", "The input file holds no requests", None, None))
    if errors:
        raise BatchInputInvalid(errors)
    return total


@dataclass(frozen=True)
class _Models:
    """The models a line may name: id -> context length (0 for image models), and the image ones' cards."""

    context_lengths: dict[str, int]
    image_cards: dict[str, dict[str, Any] | None]


def _check_line(raw: bytes, number: int, *, endpoint: str, models: _Models,
                seen_ids: set[str]) -> dict[str, Any] | LineError:
    """The parsed request, or the line's first error."""

    def fail(code: str, param: str | None, what: str) -> LineError:
        return LineError(code, f"Line {number}: {what}", param, number)

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return fail("invalid_file_format", None, "is not UTF-8 text; the input file must be JSONL")
    try:
        request = json.loads(text)
    except json.JSONDecodeError as exc:
        return fail("invalid_json_line", None, f"is not valid JSON ({exc.msg} at column {exc.colno})")
    except RecursionError:
        return fail("invalid_json_line", None, f"nests JSON deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(request, dict):
        return fail("invalid_json_line", None, "must be a JSON object")
    for name in ("custom_id", "method", "url", "body"):
        if name not in request:
            return fail("missing_required_parameter", name, f"missing required parameter '{name}'")
    custom_id = request["custom_id"]
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return fail("invalid_value", "custom_id",
                    f"custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters")
    if has_control_character(custom_id):  # NUL cannot be stored; control characters break every report
        return fail("invalid_value", "custom_id",
                    f"custom_id {custom_id!r} holds a control character or a lone surrogate")
    problem = json_problem(request)
    if problem is not None:
        return fail("invalid_json_line", None, problem)
    if custom_id in seen_ids:
        return fail("duplicate_custom_id", "custom_id", f"custom_id {custom_id!r} appears more than once")
    seen_ids.add(custom_id)
    if request["method"] != "POST":
        return fail("invalid_method", "method", f"method must be POST, not {request['method']!r}")
    if request["url"] != endpoint:
        return fail("invalid_url", "url", f"url {request['url']!r} does not match the batch endpoint {endpoint!r}")
    body = request["body"]
    if not isinstance(body, dict):
        return fail("invalid_value", "body", "body must be a JSON object")
    body_error = (_check_image_body(body, models) if endpoint == IMAGES_ENDPOINT
                  else _check_body(body, endpoint=endpoint, models=models))
    if body_error is not None:
        code, param, what = body_error
        return fail(code, param, what)
    return request


def _body_error(error: RequestError) -> tuple[str, str, str]:
    """The contract's error with its parameter named from the line ("n" -> "body.n", as a whole word only)."""
    param = f"body.{error.param}" if error.param else "body"
    message = error.message
    if error.param:
        message = re.sub(rf"(?<![\w.]){re.escape(error.param)}(?![\w])", param, message, count=1)
    return error.code or "invalid_value", param, message


def _check_body(body: dict[str, Any], *, endpoint: str, models: _Models) -> tuple[str, str, str] | None:
    """(code, param, message) for the body's first problem, or None.

    The rules are the request contract's (the worker applies the same ones); the API adds what needs
    the model registry: the model exists, is a language model, and max_tokens fits its context."""
    try:
        parsed = parse_body(endpoint, body)
    except RequestError as error:
        return _body_error(error)
    context_length = models.context_lengths.get(parsed.model)
    if context_length is None:
        return ("model_not_found", "body.model",
                f"model {parsed.model!r} does not exist (GET /v1/models lists them)")
    if parsed.model in models.image_cards:
        return ("unsupported_model", "body.model",
                f"model {parsed.model!r} is an image model: send its lines to {IMAGES_ENDPOINT}, not {endpoint}")
    if parsed.max_tokens is not None and parsed.max_tokens > context_length:
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        return ("invalid_value", f"body.{name}",
                f"body.{name} must be at most the model's context length {context_length} (got {parsed.max_tokens})")
    return None


def _check_image_body(body: dict[str, Any], models: _Models) -> tuple[str, str, str] | None:
    """(code, param, message) for an image line's first problem: the contract, then the model's card."""
    try:
        request = parse_image_body(body)
        if request.model not in models.context_lengths:
            return ("model_not_found", "body.model",
                    f"model {request.model!r} does not exist (GET /v1/models lists them)")
        if request.model not in models.image_cards:
            return ("unsupported_model", "body.model", f"model {request.model!r} is a language model: send its "
                    f"lines to /v1/chat/completions or /v1/completions, not {IMAGES_ENDPOINT}")
        card = models.image_cards[request.model]
        if card is None:
            return ("model_not_found", "body.model",
                    f"{request.model!r} is an architecture, not a trained model: train one on your images "
                    f"(POST /v1/fine_tuning/jobs with model {request.model!r}) and name it (ft:{request.model}:...)")
        check_against_card(request, card)
    except RequestError as error:
        return _body_error(error)
    return None


@dataclass
class _SpooledShard:
    """A shard's lines in a local file, waiting for the whole input to pass validation."""

    index: int  # the shard's index within the batch, in order of creation
    model: str
    file: BinaryIO  # open for writing until the shard is full or the input ends
    lines: int = 0
    tokens: int = 0  # the most its requests may generate


class _ShardSpool:
    """Per-model shard files in a local temporary directory, uploaded only once the file is valid."""

    def __init__(self, directory: Path, shard_size: int) -> None:
        self.directory = directory
        self.shard_size = max(1, shard_size)
        self.filling: dict[str, _SpooledShard] = {}  # model -> its shard still taking lines
        self.full: list[_SpooledShard] = []  # closed shards

    def _path(self, index: int) -> Path:
        return self.directory / f"{index:05d}.jsonl"

    def add(self, number: int, request: dict[str, Any], max_tokens: int) -> None:
        model = request["body"]["model"]
        shard = self.filling.get(model)
        if shard is None:
            index = len(self.filling) + len(self.full)
            shard = self.filling[model] = _SpooledShard(index, model, open(self._path(index), "wb"))  # noqa: SIM115
        line = {"line": number, "custom_id": request["custom_id"], "body": request["body"]}
        shard.file.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
        shard.lines += 1
        shard.tokens += max_tokens
        if shard.lines == self.shard_size:
            self._close(model)

    def _close(self, model: str) -> None:
        shard = self.filling.pop(model)
        shard.file.close()
        self.full.append(shard)

    def close_all(self) -> None:
        for model in list(self.filling):
            self._close(model)

    def upload(self, *, store: Store, batch_id: str) -> list[ShardPlan]:
        """Stores every shard; the plans in index order."""
        self.close_all()
        plans = []
        for shard in sorted(self.full, key=lambda spooled: spooled.index):
            key = shard_key(batch_id, shard.index)
            with open(self._path(shard.index), "rb") as spooled:
                store.put_stream(key, spooled)
            plans.append(ShardPlan(index=shard.index, model=shard.model, input_key=key, request_count=shard.lines,
                                   requested_tokens=shard.tokens))
        return plans
