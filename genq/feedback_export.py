"""Rated batch lines -> fine-tune training lines, in OpenAI's DPO (preference) or supervised chat format.

Pure and torch-free: `POST /v1/batches/{id}/feedback/export` (api/feedback_files.py) and the offline
`genq feedback` command both call build_examples. A rating is "good" (score 5), "bad" (score 1) or an
integer 1-5 (the score itself).

    dpo         {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
                 "non_preferred_output": [{"role": "assistant", "content": ...}]}
                a corrected line: preferred = the correction, non-preferred = the model's output;
                lines without a correction that share identical messages: the best-rated output over the
                worst-rated one (one pair per messages), when their scores differ.
    supervised  {"messages": [..., {"role": "assistant", "content": ...}]}
                the correction, else the model's output when rated good or >= 4.

The messages are the request's as the model read them (the batch request contract: "developer" is
"system", text parts joined). Every example is checked against the fine-tuning file contract
(workers.fine_tuning.data), the one that POST /v1/fine_tuning/jobs applies: one it refuses (a tool
turn, a prompt not ending with a user turn, an empty answer) is left out, so the file is accepted
whole. Examples come out in the order of the input lines they start from (a pair: its earlier line).
"""

from __future__ import annotations

import enum
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from workers.batches.request_contract import RequestError, parse_body
from workers.fine_tuning.data import Method, TrainingFileError, check_example

GOOD_SCORE, BAD_SCORE = 5, 1
ACCEPTED_SCORE = 4  # supervised keeps an uncorrected output rated at least this
RATING_LABELS = {"good": GOOD_SCORE, "bad": BAD_SCORE}


class ExportFormat(enum.StrEnum):
    DPO = "dpo"
    SUPERVISED = "supervised"


class RatingError(ValueError):
    """A rating that is neither "good", "bad" nor an integer 1-5."""


class SkipReason(enum.StrEnum):
    """Why a rated line gave no training example; the values complete "N rated line(s) ..."."""

    NOT_CHAT = "whose request is not a chat request"
    FAILED = "whose request failed, without a correction"
    FAILED_CORRECTED = "whose request failed, so their correction has no model output to be preferred over"
    SAME_AS_OUTPUT = "whose correction is the model's output unchanged"
    UNPAIRED = "without a correction and with no other rated line of the same messages"
    SAME_RATING = "without a correction, rated the same as every other line of the same messages"
    SAME_OUTPUT = "whose best- and worst-rated outputs for the same messages are the same text"
    BETWEEN = "rated between the best and the worst output of the same messages (one pair per messages)"
    NOT_ACCEPTED = f"without a correction and rated below {ACCEPTED_SCORE} (or bad)"
    REFUSED = "whose example the fine-tuning file contract refuses"


@dataclass(frozen=True)
class RatedLine:
    """One rated request with what the export needs of its input and output lines."""

    custom_id: str
    line_number: int  # 1-based line in the batch's input file: the order examples come out in
    score: int  # 1-5 (rating_score of the rating)
    corrected: str | None  # the rater's better answer; None: no correction
    messages: list[dict[str, str]] | None  # request_messages of the request; None: not a chat request
    output: str | None  # the model's answer (output_content); None: the request failed


@dataclass(frozen=True)
class TrainingExport:
    """What build_examples made of the rated lines."""

    export_format: ExportFormat
    examples: list[dict[str, Any]]  # the training lines, in input-line order
    skipped: Counter[SkipReason] = field(default_factory=Counter)  # rated lines that gave no example, by why
    first_refusal: str | None = None  # the contract's message for the first refused example

    def why_empty(self) -> str:
        """Why there are no examples, for the 400 and the CLI's error."""
        if not self.skipped:
            return "There are no ratings to export."
        reasons = []
        for reason, count in self.skipped.most_common():
            detail = f" ({self.first_refusal})" if reason == SkipReason.REFUSED and self.first_refusal else ""
            reasons.append(f"{count} rated line(s) {reason.value}{detail}")
        return f"The ratings give no {self.export_format.value} training example: {'; '.join(reasons)}."


class _Answer(NamedTuple):
    """An uncorrected line with messages and an output: a candidate side of a best-versus-worst pair."""

    line_number: int
    score: int
    messages: list[dict[str, str]]
    output: str


class _Candidate(NamedTuple):
    """An example before the training-file contract has checked it."""

    first_line: int  # the earliest input line it is made of
    lines: int  # how many rated lines it uses (a pair of uncorrected lines: 2)
    example: dict[str, Any]


def rating_score(rating: Any) -> int:
    """The 1-5 score of a rating: "good" 5, "bad" 1, an integer 1-5 itself; RatingError for anything else."""
    if isinstance(rating, str) and rating in RATING_LABELS:
        return RATING_LABELS[rating]
    if isinstance(rating, int) and not isinstance(rating, bool) and BAD_SCORE <= rating <= GOOD_SCORE:
        return rating
    raise RatingError(f"must be 'good', 'bad' or an integer from {BAD_SCORE} to {GOOD_SCORE}, not {rating!r}")


def correction_text(corrected: str | None) -> str | None:
    """The correction as a rater gave it, or None for an absent or blank one (no correction)."""
    return corrected if corrected is not None and corrected.strip() else None


def request_messages(endpoint: str, body: Any) -> list[dict[str, str]] | None:
    """The chat messages [{"role", "content": str}] of a request body as the worker reads it, or None for
    a body that is not a chat request (a completions prompt, or one the request contract refuses)."""
    try:
        return parse_body(endpoint, body, strict=False).messages  # strict=False: what the worker ran
    except RequestError:
        return None


def output_content(output_line: Any) -> str | None:
    """The assistant text of a successful chat output line, or None (an error line, a non-chat answer).

    output_line: {"custom_id", "response": {"status_code": 200, "body": {"choices": [{"message":
    {"role": "assistant", "content": "..."}}]}}, "error": null}"""
    response = output_line.get("response") if isinstance(output_line, dict) else None
    if not isinstance(response, dict) or response.get("status_code") != 200:
        return None
    body = response.get("body")
    choices = body.get("choices") if isinstance(body, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else None


def build_examples(lines: Iterable[RatedLine], export_format: ExportFormat) -> TrainingExport:
    """The training lines of export_format made from the rated lines, and why the others gave none."""
    ordered = sorted(lines, key=lambda line: line.line_number)
    skipped: Counter[SkipReason] = Counter()
    candidates = _dpo(ordered, skipped) if export_format == ExportFormat.DPO else _supervised(ordered, skipped)
    examples, first_refusal = [], None
    for candidate in sorted(candidates, key=lambda c: c.first_line):
        refusal = _refusal(candidate.example, export_format)
        if refusal is None:
            examples.append(candidate.example)
        else:
            skipped[SkipReason.REFUSED] += candidate.lines
            first_refusal = first_refusal or refusal
    return TrainingExport(export_format, examples, skipped, first_refusal)


def training_jsonl(examples: list[dict[str, Any]]) -> bytes:
    """The examples as a JSONL fine-tune file, one compact line each."""
    return b"".join(json.dumps(example, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                    for example in examples)


def _refusal(example: dict[str, Any], export_format: ExportFormat) -> str | None:
    """The fine-tuning contract's objection to one example, or None when it accepts it."""
    # The per-line checks of workers.fine_tuning.data.read_training_file (which needs a whole file).
    try:
        check_example(example, Method.DPO if export_format == ExportFormat.DPO else Method.SUPERVISED)
    except TrainingFileError as error:
        return error.message.removeprefix("line 1: ")
    return None


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def _preference(messages: list[dict[str, str]], preferred: str, non_preferred: str) -> dict[str, Any]:
    return {"input": {"messages": messages}, "preferred_output": [_assistant(preferred)],
            "non_preferred_output": [_assistant(non_preferred)]}


def _dpo(lines: list[RatedLine], skipped: Counter[SkipReason]) -> list[_Candidate]:
    candidates: list[_Candidate] = []
    by_messages: dict[str, list[_Answer]] = {}  # canonical JSON of the messages -> uncorrected lines, in order
    for line in lines:
        if line.messages is None:
            skipped[SkipReason.NOT_CHAT] += 1
        elif line.corrected is not None:
            if line.output is None:
                skipped[SkipReason.FAILED_CORRECTED] += 1
            elif line.corrected == line.output:
                skipped[SkipReason.SAME_AS_OUTPUT] += 1
            else:
                candidates.append(_Candidate(line.line_number, 1,
                                             _preference(line.messages, line.corrected, line.output)))
        elif line.output is None:
            skipped[SkipReason.FAILED] += 1
        else:
            key = json.dumps(line.messages, sort_keys=True, ensure_ascii=False)
            answer = _Answer(line.line_number, line.score, line.messages, line.output)
            by_messages.setdefault(key, []).append(answer)
    for group in by_messages.values():
        best = max(group, key=lambda answer: answer.score)  # ties: the earliest line (max and min keep the first)
        worst = min(group, key=lambda answer: answer.score)
        if len(group) == 1:
            skipped[SkipReason.UNPAIRED] += 1
        elif best.score == worst.score:
            skipped[SkipReason.SAME_RATING] += len(group)
        elif best.output == worst.output:
            skipped[SkipReason.SAME_OUTPUT] += len(group)
        else:
            candidates.append(_Candidate(min(best.line_number, worst.line_number), 2,
                                         _preference(best.messages, best.output, worst.output)))
            if len(group) > 2:
                skipped[SkipReason.BETWEEN] += len(group) - 2
    return candidates


def _supervised(lines: list[RatedLine], skipped: Counter[SkipReason]) -> list[_Candidate]:
    candidates: list[_Candidate] = []
    for line in lines:
        if line.messages is None:
            skipped[SkipReason.NOT_CHAT] += 1
        elif line.corrected is not None:
            candidates.append(_Candidate(line.line_number, 1, {"messages": [*line.messages,
                                                                            _assistant(line.corrected)]}))
        elif line.output is None:
            skipped[SkipReason.FAILED] += 1
        elif line.score >= ACCEPTED_SCORE:
            candidates.append(_Candidate(line.line_number, 1, {"messages": [*line.messages, _assistant(line.output)]}))
        else:
            skipped[SkipReason.NOT_ACCEPTED] += 1
    return candidates
