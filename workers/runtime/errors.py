"""Exceptions of the model runtime: each names what was wrong, never a bare numpy or struct traceback.

Torch-free: the job layer matches them with isinstance.
"""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(Exception):
    """A checkpoint could not be loaded: `path` is the file or directory, `problem` says why."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"cannot load model from {self.path}: {problem}")


class RequestFailure(Exception):
    """Why one request got no completion: carried in GenerationResult.error; the other requests run on."""


class ContextLengthError(RequestFailure, ValueError):
    """A prompt (or prompt + max_tokens) does not fit in the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        super().__init__(
            f"this model's maximum context length is {context_length} tokens, but the request needs "
            f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt + {max_tokens} for the completion)"
        )


class InvalidGenerationRequest(RequestFailure, ValueError):
    """The request cannot run as given (empty prompt, token ids outside the vocabulary, max_tokens < 1)."""


class CacheTooSmallError(RequestFailure):
    """prompt + max_tokens need more KV-cache blocks than the whole pool holds."""

    def __init__(self, tokens: int, pool_tokens: int) -> None:
        self.tokens = tokens
        self.pool_tokens = pool_tokens
        super().__init__(f"the request needs {tokens} tokens of KV cache but the worker's whole cache holds "
                         f"{pool_tokens} (raise GENQ_KV_CACHE_MB or lower max_tokens)")


class GenerationFailedError(RequestFailure):
    """The model raised while running this request alone (after a batch it was in had failed)."""


class EngineFailure(RuntimeError):
    """The engine cannot go on (out of memory, a lost device): every request it held is unfinished, and
    the job layer gives its work to another attempt."""
