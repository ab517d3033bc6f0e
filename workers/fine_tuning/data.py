"""The training-file contract: OpenAI fine-tuning JSONL lines -> normalised, deduplicated examples.

Torch-free and tokenizer-free: the API validates an upload with `read_training_file` when a job is
created, and the worker reads the same file with the same function. Formats (OpenAI FT-GUIDE):

    supervised  {"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight"?: 0|1}, ...]}
    dpo         {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": str}],
                 "non_preferred_output": [...]}

DPO's outputs are also accepted under the older spec's names `preferred_completion` /
`non_preferred_completion` (openai-api.md section 3 spells them so). Tool calls and tool roles are
refused: the trainer has no way to render them faithfully for every template.

Normalisation: contents are Unicode NFC and stripped; empty system/user/assistant turns are dropped
(counted); exact duplicate examples (after normalisation) are dropped (counted).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

MIN_EXAMPLES = 10  # OpenAI's floor for a training file
ROLES = ("system", "user", "assistant")
_TOOL_KEYS = ("tool_calls", "function_call", "tool_call_id")
_PREFERRED_KEYS = ("preferred_output", "preferred_completion")
_NON_PREFERRED_KEYS = ("non_preferred_output", "non_preferred_completion")


class Method(StrEnum):
    """The fine-tuning method of a job (OpenAI `method.type`), which fixes the file format."""

    SUPERVISED = "supervised"
    DPO = "dpo"


class TrainingFileErrorCode(StrEnum):
    """OpenAI-style error codes of a refused training or validation file (the job's error.code)."""

    INVALID_TRAINING_FILE = "invalid_training_file"  # unreadable line, not JSON, wrong structure or types
    MISSING_ASSISTANT_TURN = "missing_assistant_turn"  # a supervised example with nothing to learn from
    INVALID_DPO_LINE = "invalid_dpo_line"  # a DPO example that is malformed
    TOO_FEW_EXAMPLES = "too_few_examples"  # fewer than MIN_EXAMPLES distinct examples
    FORMAT_MISMATCH = "format_mismatch"  # the validation file's format is not the training file's


class TrainingFileError(ValueError):
    """A training file that cannot be used; `line` is 1-based (None for a problem of the whole file)."""

    def __init__(self, code: TrainingFileErrorCode, message: str, line: int | None = None) -> None:
        self.code = code
        self.line = line
        self.message = message if line is None else f"line {line}: {message}"
        super().__init__(self.message)


@dataclass(frozen=True)
class ChatMessage:
    """One normalised turn."""

    role: str  # one of ROLES
    content: str  # NFC, stripped, never empty
    weight: int = 1  # assistant turns only: 0 = context, not learned from


@dataclass(frozen=True)
class SupervisedExample:
    """A chat to learn the assistant turns of."""

    messages: tuple[ChatMessage, ...]
    line: int  # 1-based line of the file it came from


@dataclass(frozen=True)
class PreferenceExample:
    """A DPO pair: the same prompt, a preferred and a non-preferred assistant reply."""

    prompt: tuple[ChatMessage, ...]  # input.messages
    chosen: str  # preferred_output[0].content
    rejected: str  # non_preferred_output[0].content
    line: int


Example = SupervisedExample | PreferenceExample


@dataclass
class TrainingFile:
    """A validated file: its examples and what normalisation removed (reported as the job's first events)."""

    method: Method
    examples: list[Example]  # distinct examples in file order
    lines: int  # non-blank lines read
    empty_turns_dropped: int  # turns whose content was empty after stripping
    duplicates_dropped: int  # examples equal to an earlier one after normalisation


def read_training_file(lines: Iterable[str | bytes], method: Method | str, *,
                       min_examples: int = MIN_EXAMPLES) -> TrainingFile:
    """The file's examples, validated line by line; raises TrainingFileError at the first bad line, or
    TOO_FEW_EXAMPLES below min_examples distinct examples (pass 1 for a validation file)."""
    method = Method(method)
    examples: list[Example] = []
    seen: set[Example] = set()
    empty_dropped = duplicates = count = 0
    for number, raw in enumerate(lines, start=1):
        text = _decode(raw, number)
        if not text.strip():
            continue  # blank lines (a trailing newline) carry nothing
        count += 1
        example, dropped = _example(_parse_object(text, number), method, number)
        empty_dropped += dropped
        key = _without_line(example)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        examples.append(example)
    if len(examples) < min_examples:
        distinct = f"{len(examples)} distinct examples" + (f" ({duplicates} duplicates dropped)" if duplicates else "")
        raise TrainingFileError(TrainingFileErrorCode.TOO_FEW_EXAMPLES,
                                f"the file has {distinct}; at least {min_examples} are required")
    return TrainingFile(method=method, examples=examples, lines=count, empty_turns_dropped=empty_dropped,
                        duplicates_dropped=duplicates)


def validate_training_file(lines: Iterable[str | bytes], method: Method | str) -> list[Example]:
    """The distinct, normalised examples of the file (read_training_file without the counts)."""
    return read_training_file(lines, method).examples


def check_example(obj: dict[str, Any], method: Method | str, line: int = 1) -> Example:
    """One parsed line as an example of method, normalised; raises TrainingFileError as read_training_file would."""
    return _example(obj, Method(method), line)[0]


def detect_file_format(lines: Iterable[str | bytes]) -> Method:
    """The method a file is written for, told by its first non-blank line (validation-file checks)."""
    for number, raw in enumerate(lines, start=1):
        text = _decode(raw, number)
        if not text.strip():
            continue
        obj = _parse_object(text, number)
        if "input" in obj and any(k in obj for k in _PREFERRED_KEYS + _NON_PREFERRED_KEYS):
            return Method.DPO
        if "messages" in obj:
            return Method.SUPERVISED
        raise TrainingFileError(TrainingFileErrorCode.INVALID_TRAINING_FILE,
                                "expected a chat example {\"messages\": [...]} or a DPO example "
                                "{\"input\", \"preferred_output\", \"non_preferred_output\"}", number)
    raise TrainingFileError(TrainingFileErrorCode.TOO_FEW_EXAMPLES, "the file is empty")


def check_validation_format(training: Method | str, validation_lines: Iterable[str | bytes]) -> None:
    """Raises FORMAT_MISMATCH when the validation file is written for another method than the training file."""
    found = detect_file_format(validation_lines)
    if found is not Method(training):
        raise TrainingFileError(TrainingFileErrorCode.FORMAT_MISMATCH,
                                f"the validation file holds {found.value} examples but the training file holds "
                                f"{Method(training).value} examples")


# ---------------------------------------------------------------- one line


def _decode(raw: str | bytes, line: int) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainingFileError(TrainingFileErrorCode.INVALID_TRAINING_FILE,
                                f"not valid UTF-8 (byte {e.start})", line) from None


def _parse_object(text: str, line: int) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TrainingFileError(TrainingFileErrorCode.INVALID_TRAINING_FILE, f"not valid JSON ({e.msg})",
                                line) from None
    if not isinstance(obj, dict):
        raise TrainingFileError(TrainingFileErrorCode.INVALID_TRAINING_FILE,
                                f"each line must be a JSON object, not {type(obj).__name__}", line)
    return obj


def _example(obj: dict[str, Any], method: Method, line: int) -> tuple[Example, int]:
    """The example of one parsed line and the number of empty turns dropped from it."""
    if method is Method.SUPERVISED:
        return _supervised_example(obj, line)
    return _preference_example(obj, line)


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def _messages(value: Any, where: str, code: TrainingFileErrorCode, line: int) -> tuple[list[ChatMessage], int]:
    """The non-empty turns of a messages array, and how many empty ones were dropped."""
    if not isinstance(value, list) or not value:
        raise TrainingFileError(code, f"{where} must be a non-empty array of messages", line)
    out: list[ChatMessage] = []
    dropped = 0
    for i, m in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise TrainingFileError(code, f"{at} must be an object", line)
        role = m.get("role")
        if role not in ROLES:
            raise TrainingFileError(code, f"{at}.role {role!r} is not supported (use one of {', '.join(ROLES)})",
                                    line)
        if any(k in m for k in _TOOL_KEYS):
            raise TrainingFileError(code, f"{at}: tool and function calls are not supported", line)
        content = m.get("content")
        if not isinstance(content, str):
            raise TrainingFileError(code, f"{at}.content must be a string", line)
        weight = m.get("weight", 1)
        if "weight" in m and role != "assistant":
            raise TrainingFileError(code, f"{at}.weight is only allowed on assistant messages", line)
        if isinstance(weight, bool) or weight not in (0, 1):
            raise TrainingFileError(code, f"{at}.weight must be 0 or 1", line)
        content = _normalise(content)
        if not content:
            dropped += 1
            continue
        out.append(ChatMessage(role=role, content=content, weight=int(weight)))
    return out, dropped


def _refuse_tools(obj: dict[str, Any], code: TrainingFileErrorCode, line: int) -> None:
    for key in ("tools", "functions"):
        if obj.get(key):
            raise TrainingFileError(code, f"{key!r} are not supported", line)


def _supervised_example(obj: dict[str, Any], line: int) -> tuple[SupervisedExample, int]:
    code = TrainingFileErrorCode.INVALID_TRAINING_FILE
    if "messages" not in obj:
        hint = " (this is a DPO example; the job's method is supervised)" if "input" in obj else ""
        raise TrainingFileError(code, f"missing \"messages\"{hint}", line)
    _refuse_tools(obj, code, line)
    messages, dropped = _messages(obj["messages"], "messages", code, line)
    if not any(m.role == "assistant" and m.weight == 1 for m in messages):
        raise TrainingFileError(TrainingFileErrorCode.MISSING_ASSISTANT_TURN,
                                "no non-empty assistant message with weight 1 to learn from", line)
    return SupervisedExample(messages=tuple(messages), line=line), dropped


def _one_output(obj: dict[str, Any], keys: tuple[str, ...], line: int) -> str:
    code = TrainingFileErrorCode.INVALID_DPO_LINE
    key = next((k for k in keys if k in obj), None)
    if key is None:
        raise TrainingFileError(code, f"missing \"{keys[0]}\"", line)
    value = obj[key]
    if not isinstance(value, list) or len(value) != 1:
        raise TrainingFileError(code, f"{key} must be an array of exactly one assistant message", line)
    [m] = value
    if not isinstance(m, dict) or m.get("role") != "assistant":
        raise TrainingFileError(code, f"{key}[0] must be a message with role \"assistant\"", line)
    if any(k in m for k in _TOOL_KEYS):
        raise TrainingFileError(code, f"{key}[0]: tool and function calls are not supported", line)
    if not isinstance(m.get("content"), str) or not _normalise(m["content"]):
        raise TrainingFileError(code, f"{key}[0].content must be a non-empty string", line)
    return _normalise(m["content"])


def _preference_example(obj: dict[str, Any], line: int) -> tuple[PreferenceExample, int]:
    code = TrainingFileErrorCode.INVALID_DPO_LINE
    inp = obj.get("input")
    if not isinstance(inp, dict):
        hint = " (this is a supervised chat example; the job's method is dpo)" if "messages" in obj else ""
        raise TrainingFileError(code, f"\"input\" must be an object with \"messages\"{hint}", line)
    _refuse_tools(inp, code, line)
    prompt, dropped = _messages(inp.get("messages"), "input.messages", code, line)
    if not prompt or prompt[-1].role != "user":
        raise TrainingFileError(code, "input.messages must end with a non-empty user message", line)
    chosen = _one_output(obj, _PREFERRED_KEYS, line)
    rejected = _one_output(obj, _NON_PREFERRED_KEYS, line)
    if chosen == rejected:
        raise TrainingFileError(code, "the preferred and non-preferred outputs are identical", line)
    return PreferenceExample(prompt=tuple(prompt), chosen=chosen, rejected=rejected, line=line), dropped


def _without_line(example: Example) -> Example:
    """The example with line 0: equal for duplicates wherever they sit in the file."""
    if isinstance(example, SupervisedExample):
        return SupervisedExample(messages=example.messages, line=0)
    return PreferenceExample(prompt=example.prompt, chosen=example.chosen, rejected=example.rejected, line=0)
