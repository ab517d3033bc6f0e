"""Exceptions of the model runtime: each names what was wrong, never a bare numpy or struct traceback."""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(Exception):
    """A checkpoint could not be loaded: `path` is the file or directory, `problem` says why."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"cannot load model from {self.path}: {problem}")


class ContextLengthError(ValueError):
    """A prompt (or prompt + max_tokens) does not fit in the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        super().__init__(
            f"this model's maximum context length is {context_length} tokens, but the request needs "
            f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt + {max_tokens} for the completion)"
        )
