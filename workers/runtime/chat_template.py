"""Chat templates rendered as Hugging Face's apply_chat_template renders them.

Same jinja2 environment (sandboxed, trim_blocks, lstrip_blocks, loopcontrols), same helpers
(raise_exception, tojson, strftime_now) and same variables (messages, add_generation_prompt,
bos_token, eos_token, tools, documents), so a template behaves exactly as on the model card.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template is missing, does not compile, or rejected the messages (raise_exception)."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached by source text)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from e


def render_chat_template(source: str | None, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                         bos_token: str | None = None, eos_token: str | None = None,
                         tools: list[dict[str, Any]] | None = None, **extra: Any) -> str:
    """The prompt text for messages ([{"role": ..., "content": ...}, ...])."""
    if not source:
        raise ChatTemplateError("this model has no chat template; use /v1/completions with a plain prompt")
    try:
        return compile_template(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token or "",
            eos_token=eos_token or "", tools=tools, documents=None, **extra,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template rejected the messages: {e}") from e
