"""Token events -> finished GenerationResults: detokenization, stop strings and finish reasons.

Outside the step loop (vLLM v1's OutputProcessor): the scheduler knows only token ids and the
token-level stops (eos, max_tokens); this turns each request's tokens into text as they come, holding
back incomplete UTF-8, and ends a request whose text reaches a stop string (cut from the text). The
engine aborts those in the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.runtime.scheduler import TokenEvent
from workers.runtime.tokenizer import IncrementalDetokenizer, Tokenizer
from workers.runtime.types import GenerationRequest, GenerationResult


@dataclass
class _RequestText:
    request: GenerationRequest
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""


class OutputProcessor:
    """Per-request text state, keyed by the engine's request id."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestText] = {}

    def add(self, request_id: str, request: GenerationRequest) -> None:
        self._states[request_id] = _RequestText(request, self.tokenizer.detokenizer())

    def drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def process(self, events: list[TokenEvent]) -> tuple[dict[str, GenerationResult], list[str]]:
        """(engine request id -> result of each request finished by these events, ids of those that a stop
        string finished and the scheduler still runs)."""
        finished: dict[str, GenerationResult] = {}
        stopped = []
        for event in events:
            state = self._states.get(event.request_id)
            if state is None:
                continue
            state.token_ids.append(event.token_id)
            if event.logprob is not None and state.request.params.logprobs:
                state.logprobs.append(event.logprob)
            reason = event.finish_reason
            if reason != "stop":  # an eos that ends the request adds no text
                before = len(state.text)
                state.text += state.detokenizer.push(event.token_id)
                if self._cut_at_stop_string(state, before):
                    if reason is None:
                        stopped.append(event.request_id)
                    reason = "stop"
            if reason is not None:
                finished[event.request_id] = self._result(state, reason)
                del self._states[event.request_id]
        return finished, stopped

    @staticmethod
    def _cut_at_stop_string(state: _RequestText, before: int) -> bool:
        """Cuts the text at the first stop string that the characters after `before` complete."""
        stops = state.request.params.stop
        if not stops or len(state.text) == before:
            return False
        # A stop string ending in the new text starts at most len(stop) - 1 characters before it.
        start = max(0, before - max(len(s) for s in stops) + 1)
        hits = [i for i in (state.text.find(s, start) for s in stops if s) if i >= 0]
        if not hits:
            return False
        state.text = state.text[: min(hits)]
        return True

    @staticmethod
    def _result(state: _RequestText, reason: str) -> GenerationResult:
        request = state.request
        return GenerationResult(
            request_id=request.request_id,
            text=state.text,
            token_ids=list(state.token_ids),
            finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=len(request.prompt_token_ids),
            completion_tokens=len(state.token_ids),
            logprobs=list(state.logprobs) if request.params.logprobs else None,
        )
