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
    n                         1                                     one choice per line
    logprobs                  chat: boolean; completions: 0 or null  alternatives are not returned
    top_logprobs              0 or null
    stream                    false or null
    ignore_eos                boolean                               vLLM's extension
    user, metadata, store, service_tier  accepted, not used

Anything else is an unknown parameter: a typo such as "temprature" must not be silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from workers.runtime.types import SamplingParams

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
ENDPOINTS = (CHAT_ENDPOINT, COMPLETIONS_ENDPOINT)
MAX_STOP_STRINGS = 4
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

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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
    n: Any = None
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

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: Any) -> None:
        if n is not None and (type(n) is not int or n != 1):
            raise _unsupported("must be 1: genq generates one choice per line (send one line per sample)")

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
        raise _first_error(exc) from None
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
    if isinstance(parsed, _ChatBody):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in parsed.messages]
        return ParsedRequest(endpoint, parsed.model, messages, None, explicit, params)
    return ParsedRequest(endpoint, parsed.model, None, parsed.prompt, explicit, params)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _param(loc: tuple[int | str, ...]) -> str:
    """("messages", 2, "role") -> "messages[2].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _first_error(exc: ValidationError) -> RequestError:
    error = exc.errors(include_url=False)[0]
    param = _param(error["loc"])
    kind = error["type"]
    if kind == "missing":
        return RequestError(f"missing required parameter '{param}'", "missing_required_parameter", param)
    if kind == "extra_forbidden":
        return RequestError(f"unknown parameter '{param}'", "unknown_parameter", param)
    given = repr(error.get("input"))
    given = given if len(given) <= 40 else given[:37] + "..."
    if kind in _OWN_CODES:  # this module's messages read on from the name: "n must be 1: ..."
        return RequestError(f"{param} {error['msg']} (got {given})", kind, param)
    return RequestError(f"{param}: {error['msg']} (got {given})", "invalid_value", param)
