"""What crosses the seam between a job (a batch shard) and the model runtime."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class SamplingParams:
    """OpenAI sampling fields of one request, already validated."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off (a genq extension, as vLLM's)
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: derived from the request's custom_id by the caller
    stop: list[str] = field(default_factory=list)  # up to 4 stop strings; never included in the text
    max_tokens: int = 256
    logprobs: bool = False
    ignore_eos: bool = False  # keep generating past eos until max_tokens or a stop string (benchmarks; vLLM's)


@dataclass
class GenerationRequest:
    """One prompt to continue; the prompt is already tokenized (chat template applied)."""

    request_id: str  # the caller's id (custom_id), echoed in the result
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class GenerationResult:
    """The finished continuation of one request."""

    request_id: str
    text: str  # decoded completion, stop string excluded, never a split multi-byte character
    token_ids: list[int]  # completion tokens (including a final eos, if one ended it)
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] | None = None  # one per completion token when asked for
    # Set when the request could not run (e.g. prompt + max_tokens beyond the context); then text and
    # token_ids are empty and finish_reason is "length". The pipeline reports it as a per-request error.
    error: str | None = None
