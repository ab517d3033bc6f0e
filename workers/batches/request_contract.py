"""The one contract of a request body: OpenAI JSON -> a typed request with its SamplingParams.

Torch-free. The API parses every batch line with it at create, so a bad field is a 400 naming the
line and the parameter before anything runs; the worker parses the same body again (the stored
shard is trusted only as far as this contract) and then only tokenizes and checks the context
length. One rule per field, in one place:

    field                     accepted                              why
    model                     non-empty string                      (the API also checks it exists)
    max_tokens, max_completion_tokens  integer >= 1                 (<= context length: the API and worker)
    temperature               number 0..2                           0 is greedy
    top_p                     number in (0, 1]                      0 keeps nothing; use temperature 0
    top_k                     integer >= 0                          0 is off (vLLM's extension)
    min_p                     number 0..1
    presence/frequency_penalty number -2..2
    repetition_penalty        number in (0, 10]
    seed                      integer in the signed 64-bit range
    stop                      string or list of <= 4, each non-empty
    n                         integer 1..16                         choices (variants), each with its own seed
    logit_bias                {token id: number -100..100}, <= 300  OpenAI's
    response_format           text, json_object, json_schema        the schema must compile (xgrammar)
    constraints               genq's: workers.batches.constraints   hard limits, banned and required terms
    logprobs                  chat: boolean; completions: 0 or null  alternatives are not returned
    top_logprobs              0 or null
    stream                    false or null
    ignore_eos                boolean                               vLLM's extension
    user, metadata, store, service_tier  accepted, not used

Anything else is an unknown parameter: a typo such as "temprature" must not be silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from workers.batches.constraints import Constraints
from workers.runtime.types import SamplingParams

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
ENDPOINTS = (CHAT_ENDPOINT, COMPLETIONS_ENDPOINT)
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16
MAX_LOGIT_BIAS = 300
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_OWN_CODES = ("invalid_value", "invalid_type", "unsupported_value")  # this module's error types


@dataclass
class RequestError(Exception):
    """A request genq will not run; an OpenAI HTTP error body with status_code (400 unless said)."""

    message: str
    code: str | None = None
    param: str | None = None  # "temperature", "messages[2].role"
    type: str = "invalid_request_error"
    status_code: int = 400
    details: dict[str, Any] | None = None  # genq's extra fields of the error object (a nearest candidate)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": {**error, **self.details} if self.details else error}


@dataclass(frozen=True)
class ParsedRequest:
    """A valid body: what to continue, and how.

    params.seed is None when the body names none (the worker derives one per request) and
    params.max_tokens is filled in by the worker from `max_tokens` or its default."""

    endpoint: str
    model: str
    messages: list[dict[str, str]] | None  # chat: [{"role", "content"}], "developer" read as "system"
    prompt: str | list[int] | None  # completions: text or token ids
    max_tokens: int | None  # the body's limit on generated tokens, None for the default
    params: SamplingParams
    n: int = 1
    constraints: Constraints | None = None
    json_schema: str | None = None  # a response_format's schema as JSON text, "{}" for json_object
    logit_bias: dict[int, float] | None = None


def _unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported_value", message)


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # name, refusal, tool_call_id: harmless

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = Field(default=None, validate_default=True)  # absent or null: empty text

    @field_validator("content")
    @classmethod
    def _text(cls, content: Any) -> str:
        if content is None or isinstance(content, str):
            return content or ""
        if isinstance(content, list):
            if all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
                return "".join(part["text"] for part in content)
            raise _unsupported("must hold only text parts ({\"type\": \"text\", \"text\": ...})")
        raise PydanticCustomError("invalid_type", "must be a string or a list of text parts")


class _JsonSchema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = {}
    strict: bool | None = None


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> _ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError("invalid_value", "json_schema is required with type json_schema, and only then")
        return self


def _schema_text(response_format: _ResponseFormat | None) -> str | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return "{}"
    return json.dumps(response_format.json_schema.schema_, sort_keys=True)  # type: ignore[union-attr]


def check_schema_compiles(schema: str) -> None:
    """RequestError when the grammar engine cannot compile the schema (the engine would refuse it)."""
    if schema == "{}":
        return
    import xgrammar  # imports torch: only for a batch that asks for a schema

    try:
        xgrammar.Grammar.from_json_schema(schema, any_whitespace=False)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        reason = reason.split(": ", 1)[-1] if "] " in reason else reason
        raise RequestError(f"response_format.json_schema.schema cannot be compiled into a grammar: {reason}",
                           "invalid_json_schema", "response_format.json_schema.schema") from None


Unit = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class _Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    model: Annotated[str, Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Unit | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stop: Any = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    response_format: _ResponseFormat | None = None
    constraints: Constraints | None = None
    stream: Any = None
    stream_options: None = None
    ignore_eos: bool | None = None
    top_logprobs: Any = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: Any) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) \
                or len(stops) > MAX_STOP_STRINGS:
            raise PydanticCustomError("invalid_value", "must be a non-empty string or a list of at most "
                                      "{most} non-empty strings", {"most": MAX_STOP_STRINGS})
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is not None:
            if len(bias) > MAX_LOGIT_BIAS:
                raise PydanticCustomError("invalid_value", "may hold at most {most} tokens", {"most": MAX_LOGIT_BIAS})
            if not all(key.isdigit() for key in bias):
                raise PydanticCustomError("invalid_value", "keys must be token ids (strings of digits)")
        return bias

    @model_validator(mode="after")
    def _text_controls(self) -> _Sampling:
        if self.constraints is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise PydanticCustomError("unsupported_value", "constraints apply to text output: with a JSON "
                                      "response_format, limit fields in the schema (maxLength, maxItems)")
        return self

    @field_validator("stream")
    @classmethod
    def _not_streamed(cls, stream: Any) -> None:
        if stream not in (None, False) or type(stream) not in (type(None), bool):
            raise _unsupported("must be false in a batch (results are written to the output file)")

    @field_validator("top_logprobs")
    @classmethod
    def _no_alternatives(cls, top: Any) -> None:
        if top is not None and (type(top) is not int or top != 0):
            raise _unsupported("must be 0: genq returns the chosen token's logprob only")


class _ChatBody(_Sampling):
    messages: Annotated[list[_Message], Field(min_length=1)]
    logprobs: bool | None = None


class _CompletionBody(_Sampling):
    prompt: Any
    logprobs: Any = None
    echo: Literal[False] | None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a one-prompt list; several prompts per line would need n > 1 choices
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt):
            return prompt
        raise PydanticCustomError("invalid_value", "must be a string, a non-empty list of token ids, "
                                  "or a list of one of these")

    @field_validator("logprobs")
    @classmethod
    def _chosen_only(cls, logprobs: Any) -> bool:
        if logprobs is None or logprobs is False:
            return False
        if type(logprobs) is int and logprobs == 0:
            return True
        raise _unsupported("must be 0 or null: genq returns the chosen token's logprob only")


_BODIES: dict[str, type[_Sampling]] = {CHAT_ENDPOINT: _ChatBody, COMPLETIONS_ENDPOINT: _CompletionBody}


def parse_body(endpoint: str, body: Any, *, strict: bool = True) -> ParsedRequest:
    """The typed request of one body; RequestError naming the first bad parameter otherwise.

    strict=False (the worker) drops unknown parameters instead of refusing them: a shard stored by an
    older API, which ignored some fields, must still run after an upgrade."""
    schema = _BODIES.get(endpoint)
    if schema is None:
        raise RequestError(f"endpoint {endpoint} is not supported (one of {', '.join(ENDPOINTS)})", "invalid_url",
                           "url")
    if not isinstance(body, dict):
        raise RequestError("body must be a JSON object", "invalid_type", "body")
    if not strict:
        body = {name: value for name, value in body.items() if name in schema.model_fields}
    try:
        parsed = schema.model_validate(body)
    except ValidationError as exc:
        raise first_error(exc) from None
    explicit = parsed.max_completion_tokens if parsed.max_completion_tokens is not None else parsed.max_tokens
    params = SamplingParams(
        temperature=_or(parsed.temperature, 1.0),
        top_p=_or(parsed.top_p, 1.0),
        top_k=_or(parsed.top_k, 0),
        min_p=_or(parsed.min_p, 0.0),
        presence_penalty=_or(parsed.presence_penalty, 0.0),
        frequency_penalty=_or(parsed.frequency_penalty, 0.0),
        repetition_penalty=_or(parsed.repetition_penalty, 1.0),
        seed=parsed.seed,
        stop=parsed.stop or [],
        max_tokens=explicit or 0,
        logprobs=bool(parsed.logprobs),
        ignore_eos=bool(parsed.ignore_eos),
    )
    schema = _schema_text(parsed.response_format)
    if strict and schema is not None:
        check_schema_compiles(schema)
    controls = {"n": parsed.n or 1, "constraints": parsed.constraints, "json_schema": schema,
                "logit_bias": {int(k): v for k, v in parsed.logit_bias.items()} if parsed.logit_bias else None}
    if isinstance(parsed, _ChatBody):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in parsed.messages]
        return ParsedRequest(endpoint, parsed.model, messages, None, explicit, params, **controls)
    return ParsedRequest(endpoint, parsed.model, None, parsed.prompt, explicit, params, **controls)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _param(loc: tuple[int | str, ...]) -> str:
    """("messages", 2, "role") -> "messages[2].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def first_error(exc: ValidationError) -> RequestError:
    error = exc.errors(include_url=False)[0]
    param = _param(error["loc"])
    kind = error["type"]
    if kind == "missing":
        return RequestError(f"missing required parameter '{param}'", "missing_required_parameter", param)
    if kind == "extra_forbidden":
        return RequestError(f"unknown parameter '{param}'", "unknown_parameter", param)
    given = repr(error.get("input"))
    given = given if len(given) <= 40 else given[:37] + "..."
    if kind in _OWN_CODES and not param:  # a rule across fields, stated whole
        return RequestError(error["msg"], kind, None)
    if kind in _OWN_CODES:  # this module's messages read on from the name: "stop must be ..."
        return RequestError(f"{param} {error['msg']} (got {given})", kind, param)
    return RequestError(f"{param}: {error['msg']} (got {given})", "invalid_value", param)
