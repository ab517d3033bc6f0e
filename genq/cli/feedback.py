"""`genq feedback`: a fine-tune file from a batch's input and output files and a CSV of ratings, offline.

The same conversion as POST /v1/batches/{id}/feedback/export (genq.feedback_export). The CSV has a
header row naming its columns: custom_id and rating (good, bad or 1-5) are required, corrected and
comment optional; a later row for a custom_id replaces an earlier one, as a later rating does in the API.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from genq.cli.console import EXIT_INVALID_INPUT, console
from genq.feedback_export import (
    ExportFormat,
    RatedLine,
    RatingError,
    build_examples,
    correction_text,
    output_content,
    rating_score,
    request_messages,
    training_jsonl,
)
from genq.jsonl import batch_lines

CSV_COLUMNS = ("custom_id", "rating", "corrected", "comment")
REQUIRED_COLUMNS = ("custom_id", "rating")


class FeedbackInputError(ValueError):
    """A file the command cannot use; the message names the file and the 1-based line."""


@dataclass(frozen=True)
class CsvRating:
    """One row of the ratings CSV."""

    score: int  # 1-5
    corrected: str | None  # None: no correction (absent or blank)


@dataclass(frozen=True)
class InputRequest:
    """One request of the batch's input file."""

    line: int  # 1-based line in the input file
    url: str  # its endpoint, "/v1/chat/completions" for a chat request ("" when the line has none)
    body: Any


def _jsonl_objects(path: Path) -> list[tuple[int, dict[str, Any]]]:
    return batch_lines(path, FeedbackInputError)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def read_requests(path: Path) -> dict[str, InputRequest]:
    """custom_id -> request of an OpenAI batch input file ({"custom_id", "method", "url", "body"} lines)."""
    return {item["custom_id"]: InputRequest(line=number, url=_text(item.get("url")), body=item.get("body"))
            for number, item in _jsonl_objects(path)}


def read_outputs(path: Path) -> dict[str, str | None]:
    """custom_id -> the model's answer in a batch output file (None for an error line)."""
    return {item["custom_id"]: output_content(item) for _, item in _jsonl_objects(path)}


def read_ratings(path: Path, known: dict[str, InputRequest]) -> dict[str, CsvRating]:
    """custom_id -> its last rating in the CSV; FeedbackInputError naming the line of the first bad row
    (an unknown column, a missing or unknown custom_id, a rating not good, bad or 1-5)."""
    ratings: dict[str, CsvRating] = {}
    header: list[str] | None = None
    start = 1  # the line the next row starts on (a quoted field may span lines)
    with path.open(newline="", encoding="utf-8-sig") as text:  # utf-8-sig: a spreadsheet's byte-order mark
        reader = csv.reader(text)
        try:
            for row in reader:
                line, start = start, reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                if header is None:
                    header = _header(path, line, row)
                    continue
                custom_id, rating = _csv_rating(path, line, header, row, known)
                ratings[custom_id] = rating
        except UnicodeDecodeError:
            raise FeedbackInputError(f"{path} line {start}: not UTF-8 text") from None
        except csv.Error as exc:
            raise FeedbackInputError(f"{path} line {start}: {exc}") from None
    if header is None:
        raise FeedbackInputError(f"{path}: empty; the first line names the columns {','.join(CSV_COLUMNS)}")
    return ratings


def _csv_rating(path: Path, line: int, header: list[str], row: list[str],
                known: dict[str, InputRequest]) -> tuple[str, CsvRating]:
    """(custom_id, rating) of one data row; a row may leave out trailing empty cells."""
    if len(row) > len(header):
        raise FeedbackInputError(f"{path} line {line}: {len(row)} fields, but the header names {len(header)} "
                                 "(quote a field that holds a comma)")
    cells = dict(zip(header, row, strict=False))
    custom_id = cells.get("custom_id", "").strip()
    if not custom_id:
        raise FeedbackInputError(f"{path} line {line}: custom_id is empty")
    if custom_id not in known:
        raise FeedbackInputError(f"{path} line {line}: custom_id {custom_id!r} is not in the input file")
    raw = cells.get("rating", "").strip()
    try:
        score = rating_score(int(raw) if raw.isascii() and raw.isdigit() else raw.lower())
    except RatingError as exc:
        raise FeedbackInputError(f"{path} line {line}: rating {exc}") from None
    # The correction exactly as written: only the id and the rating are trimmed.
    return custom_id, CsvRating(score=score, corrected=correction_text(cells.get("corrected")))


def _header(path: Path, line: int, row: list[str]) -> list[str]:
    names = [cell.strip().lower() for cell in row]
    unknown = [name for name in names if name not in CSV_COLUMNS]
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if unknown or missing or len(set(names)) != len(names):
        problem = (f"unknown column {unknown[0]!r}" if unknown else f"no {missing[0]!r} column" if missing
                   else "a column is named twice")
        raise FeedbackInputError(f"{path} line {line}: {problem}; the columns are {','.join(CSV_COLUMNS)} "
                                 f"({' and '.join(REQUIRED_COLUMNS)} required)")
    return names


def rated_lines(*, requests: dict[str, InputRequest], outputs: dict[str, str | None],
                ratings: dict[str, CsvRating]) -> list[RatedLine]:
    """The rated requests with their messages and answers (None where the output file has no answer)."""
    lines = []
    for custom_id, rating in ratings.items():
        request = requests[custom_id]
        lines.append(RatedLine(custom_id=custom_id, line_number=request.line, score=rating.score,
                               corrected=rating.corrected, messages=request_messages(request.url, request.body),
                               output=outputs.get(custom_id)))
    return lines


def feedback(
    output_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, metavar="BATCH_OUTPUT.jsonl",
                                                help="The batch's output file (JSONL).")],
    input_file: Annotated[Path, typer.Option("--input", exists=True, dir_okay=False, metavar="BATCH_INPUT.jsonl",
                                             help="The batch's input file (JSONL).")],
    ratings_file: Annotated[Path, typer.Option("--ratings", exists=True, dir_okay=False, metavar="RATINGS.csv",
                                               help="CSV with a header: custom_id,rating,corrected,comment; "
                                                    "rating good, bad or 1-5.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="OUT.jsonl", help="The fine-tune file to write (JSONL).")],
    export_format: Annotated[ExportFormat, typer.Option("--format", help="dpo: preference pairs; supervised: "
                                                        "chats ending in the accepted or corrected answer.")]
    = ExportFormat.DPO,
) -> None:
    """Make a fine-tune file (DPO or supervised) from a batch's output, its input and a CSV of ratings."""
    try:
        requests = read_requests(input_file)
        lines = rated_lines(requests=requests, outputs=read_outputs(output_file),
                            ratings=read_ratings(ratings_file, requests))
    except FeedbackInputError as exc:
        console.print(str(exc), style="red", markup=False)
        raise typer.Exit(EXIT_INVALID_INPUT) from None
    export = build_examples(lines, export_format)
    if not export.examples:
        console.print(export.why_empty(), style="red", markup=False)
        raise typer.Exit(EXIT_INVALID_INPUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(training_jsonl(export.examples))
    skipped = sum(export.skipped.values())
    console.print(f"{out}: {len(export.examples)} {export_format.value} example(s) from {len(lines)} rating(s)"
                  + (f"; {skipped} rated line(s) gave none" if skipped else ""), markup=False)
