"""What crosses the seam between a job (a batch shard) and the model runtime; torch-free.

The job layer sees a served model only through `ServedModel` (prompt rendering and `submit`) and a
running generation only through `GenerationHandle`: the real engine (workers.runtime.loader) and the
test fake both satisfy them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from workers.runtime.errors import RequestFailure


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


class LogitsProcessor(Protocol):
    """A per-request hook between the model's logits and the sampler, called at every step of its request.

    output_token_ids are the tokens generated so far (the previous step's token last), so a grammar or a
    hard limit can follow the text; logits is that request's row, [V] float32, changed in place (mask
    with -inf, add a bias). The fused sampler then applies penalties, temperature and filters to it.
    """

    def __call__(self, output_token_ids: Sequence[int], logits: Any) -> None: ...


@dataclass
class DecodingControls:
    """What the engine enforces while decoding one request (workers.runtime.controls builds the hooks).

    The job layer checks and trims the finished text against the same rules; this only makes a
    passing text likely (and banned strings impossible)."""

    banned: list[str] = field(default_factory=list)  # never in the text, across token boundaries too
    banned_case_insensitive: bool = False
    min_words: int = 0  # end-of-text masked below this many words
    max_chars: int | None = None  # end-of-text forced once the text is past a limit (then cut back)
    max_words: int | None = None
    required: list[str] = field(default_factory=list)  # a started term is finished (case-insensitive)
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> bias in [-100, 100]
    json_schema: str | None = None  # JSON text of a schema the output must follow; "{}" for any JSON object

    def any(self) -> bool:
        return bool(self.banned or self.min_words or self.max_chars or self.max_words or self.required
                    or self.logit_bias or self.json_schema is not None)


@dataclass
class GenerationRequest:
    """One prompt to continue; the prompt is already tokenized (chat template applied)."""

    request_id: str  # the caller's id (custom_id), echoed in the result
    prompt_token_ids: list[int]
    params: SamplingParams
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    controls: DecodingControls | None = None  # the engine adds its hooks for these to logits_processors
    # Which weights run it beyond the base model (a fine-tune's adapter); part of the prefix-cache key,
    # so a prompt's cached blocks are never shared across adapters.
    adapter_id: str | None = None


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
    # Set when the request could not run (prompt + max_tokens beyond the context, a model crash on this
    # request alone...); then text and token_ids are empty and finish_reason is "length". The pipeline
    # reports it as a per-request error line, chosen by the error's class.
    error: RequestFailure | None = None


class GenerationHandle(Protocol):
    """The requests of one `submit`, running in the model's engine beside everyone else's."""

    def results(self, timeout: float) -> list[GenerationResult]:
        """Results finished since the last call (request errors included), waiting up to timeout for the
        first; raises EngineFailure when the engine could not go on."""
        ...

    @property
    def done(self) -> bool:
        """Every request has a result that `results` has returned (or the handle was aborted)."""
        ...

    def abort(self) -> None:
        """Stops the requests still running and frees what they hold; they get no result."""
        ...


class ServedModel(Protocol):
    """What the job layer needs of a loaded model: prompts to token ids, and an engine to submit to."""

    context_length: int

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def submit(self, requests: list[GenerationRequest]) -> GenerationHandle: ...
