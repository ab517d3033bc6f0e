"""OpenAI request bodies -> runtime GenerationRequests, and GenerationResults -> OpenAI output lines.

Torch-free: it only calls the loaded model's `render_chat`, `encode`, `decode` and `context_length`;
the body's rules are workers.batches.request_contract's. A body that cannot be served raises RequestError,
which becomes that request's error line (HTTP 400 shape); the other requests of the shard carry on.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from typing import Any, Protocol

from jinja2 import TemplateError

from workers.batches.choices import LineChoices, decoding_controls
from workers.batches.request_contract import (
    CHAT_ENDPOINT,
    COMPLETIONS_ENDPOINT,
    ParsedRequest,
    RequestError,
    parse_body,
)
from workers.runtime.types import GenerationRequest, GenerationResult


class PromptModel(Protocol):
    """What chat.py needs of a loaded model."""

    context_length: int

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...


def stable_id(*parts: str, length: int = 24) -> str:
    """A hex id that is the same every time for the same parts (ids survive re-runs)."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:length]


def stable_seed(batch_id: str, custom_id: str) -> int:
    """The sampling seed of a request that names none: fixed per (batch, custom_id), so a retried
    shard samples the same text."""
    return int(stable_id(batch_id, custom_id, length=15), 16) & 0x7FFF_FFFF


# --- body -> GenerationRequest -------------------------------------------------------------------------


def build_request(*, endpoint: str, body: Any, batch_id: str, custom_id: str, lm: PromptModel,
                  default_max_tokens: int) -> GenerationRequest:
    """The GenerationRequest for one input line's body; RequestError when it cannot be served.

    The body is parsed by the request contract (the same rules the API applied at create); this adds
    the prompt's tokens, the context-length check and the defaults. max_tokens (or
    max_completion_tokens) defaults to min(default_max_tokens, what the context leaves after the
    prompt); an explicit value that does not fit is context_length_exceeded, as OpenAI does.
    """
    return _generation_request(parse_body(endpoint, body, strict=False), endpoint=endpoint, batch_id=batch_id,
                               custom_id=custom_id, lm=lm, default_max_tokens=default_max_tokens)


def build_line(*, endpoint: str, body: Any, batch_id: str, custom_id: str, lm: PromptModel,
               default_max_tokens: int, max_candidates_per_choice: int) -> LineChoices:
    """The choices of one input line (n, constraints, a JSON schema); RequestError when it cannot be served."""
    parsed = parse_body(endpoint, body, strict=False)
    request = _generation_request(parsed, endpoint=endpoint, batch_id=batch_id, custom_id=custom_id, lm=lm,
                                  default_max_tokens=default_max_tokens)
    return LineChoices(request, n=parsed.n, constraints=parsed.constraints, json_schema=parsed.json_schema,
                       max_candidates_per_choice=max_candidates_per_choice)


def _generation_request(parsed: ParsedRequest, *, endpoint: str, batch_id: str, custom_id: str, lm: PromptModel,
                        default_max_tokens: int) -> GenerationRequest:
    try:
        if parsed.messages is not None:
            prompt = list(lm.render_chat(parsed.messages))
        elif isinstance(parsed.prompt, str):
            prompt = list(lm.encode(parsed.prompt))
        else:
            prompt = list(parsed.prompt or [])
    except (TemplateError, ValueError, TypeError, LookupError) as exc:  # this request's, not the shard's
        raise RequestError(f"the model's chat template cannot render this request: {exc}", "invalid_value",
                           "messages" if parsed.messages is not None else "prompt") from exc
    context = int(lm.context_length)
    room = context - len(prompt)
    if room < 1 or (parsed.max_tokens is not None and parsed.max_tokens > room):
        wanted = parsed.max_tokens or 1
        param = "messages" if endpoint == CHAT_ENDPOINT else "prompt"
        raise RequestError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(prompt) + wanted} tokens ({len(prompt)} in the prompt, {wanted} for the completion). "
            "Please reduce the length of the prompt or the completion.", "context_length_exceeded", param)
    seed = parsed.params.seed
    params = replace(parsed.params, max_tokens=parsed.max_tokens or min(default_max_tokens, room),
                     seed=stable_seed(batch_id, custom_id) if seed is None else seed)
    return GenerationRequest(request_id=custom_id, prompt_token_ids=prompt, params=params,
                             controls=decoding_controls(parsed.constraints, parsed.json_schema, parsed.logit_bias))


# --- GenerationResult -> output lines ------------------------------------------------------------------


def _token_logprobs(result: GenerationResult, lm: Any) -> list[dict[str, Any]]:
    decode = getattr(lm, "decode", None)
    content = []
    for token_id, logprob in zip(result.token_ids, result.logprobs or [], strict=False):
        token = decode([token_id]) if decode else ""
        content.append({"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []})
    return content


def response_body(*, endpoint: str, body: dict[str, Any], batch_id: str, custom_id: str,
                  result: GenerationResult | None = None, lm: Any, created: int | None = None,
                  line: LineChoices | None = None) -> dict[str, Any]:
    """The chat.completion (or text_completion) object of a finished line: its one result, or the
    choices of `line` (usage then counts every candidate's tokens, and the body reports the controls)."""
    created = int(time.time()) if created is None else created
    results = line.accepted if line is not None else [result]  # type: ignore[list-item]
    completion = line.completion_tokens if line is not None else results[0].completion_tokens
    prompt = results[0].prompt_tokens
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    model = body.get("model", "")
    if endpoint == COMPLETIONS_ENDPOINT:
        choices = [{"text": r.text, "index": i, "logprobs": _completion_logprobs(r, lm),
                    "finish_reason": r.finish_reason} for i, r in enumerate(results)]
        out = {"id": f"cmpl-{stable_id(batch_id, custom_id)}", "object": "text_completion", "created": created,
               "model": model, "choices": choices, "usage": usage}
    else:
        choices = [{
            "index": i,
            "message": {"role": "assistant", "content": r.text, "refusal": None},
            "logprobs": {"content": _token_logprobs(r, lm), "refusal": None} if r.logprobs is not None else None,
            "finish_reason": r.finish_reason,
        } for i, r in enumerate(results)]
        out = {"id": f"chatcmpl-{stable_id(batch_id, custom_id)}", "object": "chat.completion", "created": created,
               "model": model, "choices": choices, "usage": usage, "system_fingerprint": None}
    if line is not None and (line.checked or line.n > 1):
        usage["candidates"] = line.tried
        out["genq"] = line.report()
    return out


def _completion_logprobs(result: GenerationResult, lm: Any) -> dict[str, Any] | None:
    if result.logprobs is None:
        return None
    tokens = _token_logprobs(result, lm)
    return {"tokens": [t["token"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": None, "text_offset": None}


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
