"""Catalog in, catalog out: CSV rows -> OpenAI batch lines (a jinja2 template per row), and batch
output lines -> the CSV with the generated text as new columns. Torch-free.

    build_batch(rows, template, ...) -> [batch line]        every row rendered before anything is written
    join_results(rows, output_lines, error_lines, ...) -> (fieldnames, rows)

Templates run in jinja2's immutable sandbox with StrictUndefined: a column the template names that
the CSV lacks is a CatalogError naming the row, its line in the file and the columns there are.
String values in `constraints` are templates too ({"required": ["{{ material }}"]}).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_MODEL = "smollm2-135m-instruct"
_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)


class CatalogError(ValueError):
    """A row that cannot become a request (row: 1-based data row, None for the whole file)."""

    def __init__(self, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


def read_catalog(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise CatalogError(f"{path} has no data rows")
    return rows


def _render(template: jinja2.Template, row: dict[str, str], number: int, source: str) -> str:
    try:
        return template.render(**row, row=row)
    except jinja2.UndefinedError as exc:
        name = str(exc).split("'")[1] if "'" in str(exc) else str(exc)
        raise CatalogError(f"row {number} (line {number + 1} of {source}): the template uses {name!r}, which is "
                           f"not a column (columns: {', '.join(row)})", number) from None
    except jinja2.TemplateError as exc:
        raise CatalogError(f"row {number} (line {number + 1} of {source}): the template failed: {exc}",
                           number) from None


def _compile(source: str, what: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise CatalogError(f"{what} does not compile: line {exc.lineno}: {exc.message}") from None


def _render_values(value: Any, row: dict[str, str], number: int, source: str) -> Any:
    if isinstance(value, str):
        return _render(_compile(value, "a constraints value"), row, number, source) if "{" in value else value
    if isinstance(value, list):
        return [_render_values(v, row, number, source) for v in value]
    if isinstance(value, dict):
        return {k: _render_values(v, row, number, source) for k, v in value.items()}
    return value


def build_batch(rows: list[dict[str, str]], template: str, *, system: str | None = None,
                custom_id_column: str | None = None, n: int | None = None,
                constraints: dict[str, Any] | None = None, body_extra: dict[str, Any] | None = None,
                model: str = DEFAULT_MODEL, source: str = "the catalog") -> list[dict[str, Any]]:
    """One /v1/chat/completions batch line per row; CatalogError for the first row that cannot be built."""
    user = _compile(template, "the template")
    if custom_id_column is not None and custom_id_column not in rows[0]:
        raise CatalogError(f"--custom-id-column {custom_id_column!r} is not a column (columns: {', '.join(rows[0])})")
    lines, seen = [], {}
    for number, row in enumerate(rows, start=1):
        custom_id = row[custom_id_column].strip() if custom_id_column else f"row-{number}"
        if not custom_id:
            raise CatalogError(f"row {number} (line {number + 1} of {source}): empty {custom_id_column}", number)
        if custom_id in seen:
            raise CatalogError(f"row {number} (line {number + 1} of {source}): {custom_id_column} {custom_id!r} "
                               f"repeats row {seen[custom_id]}", number)
        seen[custom_id] = number
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": _render(user, row, number, source)})
        body: dict[str, Any] = {"model": model, "messages": messages, **(body_extra or {})}
        if n is not None:
            body["n"] = n
        if constraints:
            body["constraints"] = _render_values(constraints, row, number, source)
        lines.append({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
    return lines


def write_jsonl(lines: Iterable[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def read_jsonl(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    return [json.loads(raw) for raw in path.read_text(encoding="utf-8").splitlines() if raw.strip()]


def _error_of(line: dict[str, Any]) -> str | None:
    response = line.get("response")
    if response is None:
        return (line.get("error") or {}).get("message", "failed")
    if response.get("status_code") != 200:
        return (response.get("body") or {}).get("error", {}).get("message", f"HTTP {response.get('status_code')}")
    return None


def _columns(text: str, column: str) -> dict[str, str]:
    """The text in `column`, or a JSON object's top-level fields as `column.field` (lists joined by " | ")."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        return {column: text}
    return {f"{column}.{k}": " | ".join(map(str, v)) if isinstance(v, list) else
            (json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in value.items()}


def join_results(rows: list[dict[str, str]], output_lines: list[dict[str, Any]], error_lines: list[dict[str, Any]],
                 *, custom_id_column: str | None = None, column: str = "generated",
                 variants: str = "columns") -> tuple[list[str], list[dict[str, str]]]:
    """The catalog with the generated columns and an `error` column, in catalog order; with several
    choices, numbered columns (`column_1`...) or, variants="rows", one row per choice with `variant`."""
    by_id = {line["custom_id"]: line for line in [*error_lines, *output_lines]}  # a result line wins
    fields = list(rows[0])
    added: list[str] = []
    out = []
    for number, row in enumerate(rows, start=1):
        custom_id = row[custom_id_column] if custom_id_column else f"row-{number}"
        line = by_id.get(custom_id)
        error = "no result" if line is None else _error_of(line)
        texts = [] if error else [c["message"]["content"] for c in line["response"]["body"]["choices"]]
        if variants == "rows" and len(texts) > 1:
            expanded = [{**row, "variant": str(i + 1), **_columns(t, column), "error": ""} for i, t in
                        enumerate(texts)]
        elif len(texts) > 1:
            expanded = [{**row, **{k: v for i, t in enumerate(texts)
                                   for k, v in _columns(t, f"{column}_{i + 1}").items()}, "error": ""}]
        else:
            expanded = [{**row, **(_columns(texts[0], column) if texts else {}), "error": error or ""}]
        for new in expanded:
            added += [k for k in new if k not in fields and k not in added]
        out += expanded
    names = fields + [k for k in added if k != "error"] + ["error"]
    return names, [{k: r.get(k, "") for k in names} for r in out]


def write_csv(fieldnames: list[str], rows: list[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
