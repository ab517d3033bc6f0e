"""OpenAI request bodies -> runtime GenerationRequests, and GenerationResults -> OpenAI output lines.

Torch-free: it only calls the loaded model's `render_chat`, `encode`, `decode` and `context_length`.
A body that cannot be served raises RequestError, which becomes that request's error line (HTTP 400
shape); the other requests of the shard carry on.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Protocol

from workers.runtime.types import GenerationRequest, GenerationResult, SamplingParams

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
MAX_STOP_STRINGS = 4


class PromptModel(Protocol):
    """What chat.py needs of a loaded model."""

    context_length: int

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...


@dataclass
class RequestError(Exception):
    """A request genq will not run; written as an OpenAI HTTP error body with status_code."""

    message: str
    code: str | None = None
    param: str | None = None
    type: str = "invalid_request_error"
    status_code: int = 400

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def stable_id(*parts: str, length: int = 24) -> str:
    """A hex id that is the same every time for the same parts (ids survive re-runs)."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:length]


def stable_seed(batch_id: str, custom_id: str) -> int:
    """The sampling seed of a request that names none: fixed per (batch, custom_id), so a retried
    shard samples the same text."""
    return int(stable_id(batch_id, custom_id, length=15), 16) & 0x7FFF_FFFF


# --- body -> GenerationRequest -------------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise RequestError(f"{name} must be a number between {lo} and {hi}, got {value!r}", "invalid_value", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise RequestError(f"{name} must be an integer >= {lo}, got {value!r}", "invalid_value", name)
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean", "invalid_type", name)
    return value


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError("only text content parts are supported", "unsupported_value",
                                   f"messages[{index}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError("content must be a string or a list of text parts", "invalid_type",
                       f"messages[{index}].content")


def _chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "invalid_value", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError("each message needs a string role", "invalid_value", f"messages[{i}].role")
        role = message["role"]
        if role == "developer":
            role = "system"  # the newer OpenAI name; chat templates know "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise RequestError(f"unknown role {message['role']!r}", "invalid_value", f"messages[{i}].role")
        out.append({"role": role, "content": _message_text(message.get("content"), i)})
    return out


def _prompt_tokens(endpoint: str, body: dict[str, Any], lm: PromptModel) -> list[int]:
    if endpoint == CHAT_ENDPOINT:
        return list(lm.render_chat(_chat_messages(body)))
    if endpoint == COMPLETIONS_ENDPOINT:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a one-prompt list; several prompts per line would need n > 1 choices
        if isinstance(prompt, str):
            return list(lm.encode(prompt))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            return list(prompt)
        raise RequestError("prompt must be a string, a list of token ids, or a list of one of these",
                           "invalid_value", "prompt")
    raise RequestError(f"endpoint {endpoint} is not supported by generation workers", "invalid_url", "url")


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
                           "invalid_value", "stop")
    return stop


def build_request(*, endpoint: str, body: Any, batch_id: str, custom_id: str, lm: PromptModel,
                  default_max_tokens: int) -> GenerationRequest:
    """The GenerationRequest for one input line's body; RequestError when it cannot be served.

    max_tokens (or max_completion_tokens) defaults to min(default_max_tokens, what the context leaves
    after the prompt); an explicit value that does not fit is context_length_exceeded, as OpenAI does.
    """
    if not isinstance(body, dict):
        raise RequestError("body must be a JSON object", "invalid_type", "body")
    if body.get("stream"):
        raise RequestError("stream is not supported in batches", "unsupported_value", "stream")
    if body.get("n") not in (None, 1):
        raise RequestError("n > 1 is not supported; send one line per sample", "unsupported_value", "n")
    if endpoint == COMPLETIONS_ENDPOINT and body.get("echo"):
        raise RequestError("echo is not supported", "unsupported_value", "echo")
    prompt = _prompt_tokens(endpoint, body, lm)
    context = int(lm.context_length)
    room = context - len(prompt)
    explicit = _integer(body, "max_completion_tokens", 1)
    if explicit is None:
        explicit = _integer(body, "max_tokens", 1)
    if room < 1 or (explicit is not None and explicit > room):
        wanted = explicit if explicit is not None else 1
        param = "messages" if endpoint == CHAT_ENDPOINT else "prompt"
        raise RequestError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(prompt) + wanted} tokens ({len(prompt)} in the prompt, {wanted} for the completion). "
            "Please reduce the length of the prompt or the completion.", "context_length_exceeded", param)
    max_tokens = explicit if explicit is not None else min(default_max_tokens, room)
    seed = _integer(body, "seed", -(2**63))
    logprobs = body.get("logprobs")
    if endpoint == COMPLETIONS_ENDPOINT:
        logprobs = logprobs is not None and logprobs is not False  # an int there: how many alternatives
    elif logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError("logprobs must be a boolean", "invalid_type", "logprobs")
    params = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=int(_number(body, "top_k", 0, 0, 1 << 30)),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
        seed=seed if seed is not None else stable_seed(batch_id, custom_id),
        stop=_stop(body),
        max_tokens=max_tokens,
        logprobs=bool(logprobs),
        ignore_eos=_flag(body, "ignore_eos"),  # vLLM's extension: generate exactly max_tokens
    )
    return GenerationRequest(request_id=custom_id, prompt_token_ids=prompt, params=params)


# --- GenerationResult -> output lines ------------------------------------------------------------------


def _token_logprobs(result: GenerationResult, lm: Any) -> list[dict[str, Any]]:
    decode = getattr(lm, "decode", None)
    content = []
    for token_id, logprob in zip(result.token_ids, result.logprobs or [], strict=False):
        token = decode([token_id]) if decode else ""
        content.append({"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []})
    return content


def response_body(*, endpoint: str, body: dict[str, Any], batch_id: str, custom_id: str,
                  result: GenerationResult, lm: Any, created: int | None = None) -> dict[str, Any]:
    """The chat.completion (or text_completion) object for a finished request."""
    created = int(time.time()) if created is None else created
    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
             "total_tokens": result.prompt_tokens + result.completion_tokens}
    model = body.get("model", "")
    if endpoint == COMPLETIONS_ENDPOINT:
        logprobs = None
        if result.logprobs is not None:
            tokens = _token_logprobs(result, lm)
            logprobs = {"tokens": [t["token"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
                        "top_logprobs": None, "text_offset": None}
        return {"id": f"cmpl-{stable_id(batch_id, custom_id)}", "object": "text_completion", "created": created,
                "model": model, "choices": [{"text": result.text, "index": 0, "logprobs": logprobs,
                                             "finish_reason": result.finish_reason}], "usage": usage}
    logprobs = None
    if result.logprobs is not None:
        logprobs = {"content": _token_logprobs(result, lm), "refusal": None}
    return {
        "id": f"chatcmpl-{stable_id(batch_id, custom_id)}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": result.text, "refusal": None},
            "logprobs": logprobs,
            "finish_reason": result.finish_reason,
        }],
        "usage": usage,
        "system_fingerprint": None,
    }


def output_line(*, batch_id: str, custom_id: str, status_code: int, body: dict[str, Any],
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An output-file line (HTTP-shaped: response set, error null); extra adds genq fields."""
    line = {
        "id": f"batch_req_{stable_id(batch_id, custom_id)}",
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": f"req_{stable_id(batch_id, custom_id, 'r')}",
                     "body": body},
        "error": None,
    }
    if extra:
        line.update(extra)
    return line


def request_error_line(*, batch_id: str, custom_id: str, error: RequestError, attempt: int | None,
                       worker_id: str | None) -> dict[str, Any]:
    """An error-file line for a request the model refused (HTTP shape, OpenAI's 400 lines)."""
    return output_line(batch_id=batch_id, custom_id=custom_id, status_code=error.status_code, body=error.body(),
                       extra={"genq": {"attempt": attempt, "worker_id": worker_id}})


def batch_error_line(*, batch_id: str, custom_id: str, code: str, message: str, attempt: int | None = None,
                     worker_id: str | None = None) -> dict[str, Any]:
    """An error-file line for a request that never ran (non-HTTP shape: response null)."""
    return {
        "id": f"batch_req_{stable_id(batch_id, custom_id)}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
        "genq": {"attempt": attempt, "worker_id": worker_id},
    }
