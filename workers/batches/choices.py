"""One input line's choices: n variants, each drawn until a candidate keeps every constraint.

Torch-free. A line asks for n choices; choice i starts as candidate i (seed derived from the line's
seed, candidate 0 keeping it, so a plain line runs exactly as before). Each finished candidate is
checked (workers.batches.constraints for text, the schema for JSON, distinct from the choices already
kept when sampling): kept, cut to the limits, or replaced by a new candidate while the line's budget
(max_candidates_per_choice x n) lasts. Under greedy decoding a retry would repeat itself, so each
choice gets one candidate. A line that cannot fill its n choices fails with `constraints_not_met`
and its nearest candidate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from workers.batches.constraints import Constraints, check
from workers.batches.request_contract import RequestError
from workers.runtime.errors import ContextLengthError, GenerationFailedError, RequestFailure
from workers.runtime.types import DecodingControls, GenerationRequest, GenerationResult

_ID_SEPARATOR = "\x1f"  # custom_id + this + k: a candidate's request id


def candidate_seed(seed: int, k: int) -> int:
    """Candidate k's seed: the line's own for k = 0, a stable hash of (seed, k) after."""
    if k == 0:
        return seed
    return int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:15], 16) & 0x7FFF_FFFF


def decoding_controls(constraints: Constraints | None, json_schema: str | None,
                      logit_bias: dict[int, float] | None) -> DecodingControls | None:
    if constraints is None and json_schema is None and not logit_bias:
        return None
    c = constraints or Constraints()
    return DecodingControls(banned=list(c.banned), banned_case_insensitive=c.banned_case_insensitive,
                            min_words=c.min_words or 0, max_chars=c.max_chars, max_words=c.max_words,
                            required=list(c.required), logit_bias=dict(logit_bias or {}), json_schema=json_schema)


@dataclass
class _Rejected:
    text: str
    violations: list[str]


@dataclass
class LineChoices:
    """The choices of one line; `take` each candidate's result, submit what it returns."""

    base: GenerationRequest  # candidate 0 (request_id = the line's custom_id)
    n: int = 1
    constraints: Constraints | None = None
    json_schema: str | None = None
    max_candidates_per_choice: int = 8
    accepted: list[GenerationResult] = field(default_factory=list)
    tried: int = 0
    completion_tokens: int = 0  # every candidate's, rejected ones included
    error: RequestError | None = None
    _nearest: _Rejected | None = None
    _fallbacks: list[GenerationResult] = field(default_factory=list)
    _running: int = 0

    @property
    def custom_id(self) -> str:
        return self.base.request_id

    @property
    def checked(self) -> bool:
        return self.constraints is not None or self.json_schema is not None

    @property
    def budget(self) -> int:
        per_choice = self.max_candidates_per_choice if self.base.params.temperature > 0 and self.checked else 1
        return self.n * per_choice

    @property
    def done(self) -> bool:
        return self.error is not None or len(self.accepted) == self.n

    def first_requests(self) -> list[GenerationRequest]:
        return [self._candidate() for _ in range(self.n)]

    def _candidate(self) -> GenerationRequest:
        k = self.tried
        self.tried += 1
        self._running += 1
        if k == 0 and self.n == 1 and not self.checked:
            return self.base
        params = replace(self.base.params, seed=candidate_seed(self.base.params.seed or 0, k))
        return replace(self.base, request_id=f"{self.custom_id}{_ID_SEPARATOR}{k}", params=params)

    def take(self, result: GenerationResult) -> list[GenerationRequest]:
        """Records a candidate's result; returns the candidates to run next (none once done)."""
        self._running -= 1
        if self.done:
            return []
        self.completion_tokens += result.completion_tokens
        if result.error is not None:
            self.error = runtime_error(result.error)
            return []
        text, violations, unfinished = self._judge(result)
        kept = replace(result, request_id=self.custom_id, text=text,
                       finish_reason=result.finish_reason if text == result.text else "length")
        if not violations and not (unfinished and self.tried < self.budget):
            self.accepted.append(kept)
            return []
        if not violations:
            self._fallbacks.append(kept)  # keeps every rule but ends mid-sentence: another try first
        elif self._nearest is None or len(violations) < len(self._nearest.violations):
            self._nearest = _Rejected(text, violations)
        if self.tried < self.budget:
            return [self._candidate()]
        if self._running == 0:
            self.accepted += self._fallbacks[: self.n - len(self.accepted)]
            if not self.done:
                self.error = self._not_met()
        return []

    def _judge(self, result: GenerationResult) -> tuple[str, list[str], bool]:
        """(the text cut to the limits, the rules it breaks, whether it is prose ending mid-sentence)."""
        text, violations, unfinished = result.text, [], False
        if self.constraints is not None:
            checked = check(text, self.constraints)
            text, violations, unfinished = checked.text, checked.violations, checked.unfinished
        if self.json_schema is not None:
            violations = _json_violations(text, self.json_schema, result.finish_reason)
        if self.n > 1 and self.base.params.temperature > 0 and any(a.text == text for a in self.accepted):
            violations.append("duplicate: the same text as an earlier choice")
        return text, violations, unfinished

    def _not_met(self) -> RequestError:
        nearest = self._nearest or _Rejected("", ["no candidate"])
        return RequestError(
            f"{len(self.accepted)} of {self.n} choices kept the constraints after {self.tried} candidates; "
            f"the nearest candidate broke: {'; '.join(nearest.violations)}", "constraints_not_met", "constraints",
            details={"nearest_candidate": nearest.text, "violations": nearest.violations,
                     "candidates": self.tried})

    def report(self) -> dict[str, Any]:
        """What the finished line's body says about its controls (genq's extension)."""
        enforced = self.constraints.enforced() if self.constraints is not None else []
        if self.json_schema is not None:
            enforced.append("json_schema" if self.json_schema != "{}" else "json_object")
        return {"constraints_enforced": enforced, "candidates": self.tried}


def _json_violations(text: str, schema: str, finish_reason: str) -> list[str]:
    import jsonschema

    try:
        value = json.loads(text)
    except ValueError:
        return ["json: the output was cut before the object closed (raise max_tokens)"
                if finish_reason == "length" else "json: the output does not parse"]
    if not isinstance(value, dict):
        return ["json: the output is not an object"]
    try:
        jsonschema.validate(value, json.loads(schema))
    except jsonschema.ValidationError as exc:
        return [f"json_schema: {exc.message}"]
    return []


def runtime_error(error: RequestFailure) -> RequestError:
    """The error line of a request the runtime refused or failed on."""
    if isinstance(error, ContextLengthError):
        return RequestError(str(error), "context_length_exceeded", "messages")
    if isinstance(error, GenerationFailedError):
        return RequestError(str(error), "generation_failed", None, type="server_error", status_code=500)
    return RequestError(str(error), "invalid_request", None)
