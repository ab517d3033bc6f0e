"""Catalog in, catalog out: CSV rows -> OpenAI batch lines (a jinja2 template per row), and batch
output lines -> the CSV with the generated text as new columns. Torch-free.

    read_catalog(path) -> Catalog                           rows (column -> text), each with its line
    build_batch(rows, template, ...) -> [batch line]        every row rendered before anything is written
    join_results(rows, output_lines, error_lines, ...) -> (fieldnames, rows)

Templates run in jinja2's immutable sandbox with StrictUndefined: a column the template names that
the CSV lacks is a CatalogError naming the row, its line in the file and the columns there are.
String values in `constraints` are templates too ({"required": ["{{ material }}"]}).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import missing

from genq.jsonl import batch_lines

DEFAULT_MODEL = "smollm2-135m-instruct"
NO_RESULT = "no result"  # the error of a row that no output or error line names


class CatalogError(ValueError):
    """A catalog, template or result file that cannot be used (row: 1-based data row, None for the whole file)."""

    def __init__(self, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


class Catalog(list[dict[str, str]]):
    """A CSV's data rows (column -> text) in file order, and where each came from."""

    def __init__(self, rows: Iterable[dict[str, str]], *, columns: list[str], lines: list[int], source: str) -> None:
        super().__init__(rows)
        self.columns = columns  # the header's names, in file order
        self.lines = lines  # 1-based line of the file where each row starts (a quoted field may span lines)
        self.source = source  # the file's name, for messages


class Variants(StrEnum):
    """How join_results lays out several choices of one request."""

    COLUMNS = "columns"  # side by side: column_1 .. column_n, one row per product
    ROWS = "rows"  # one row per choice, numbered in a `variant` column


# ---- reading


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path.name}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _header(record: list[str], source: str, line: int) -> list[str]:
    names = [name.strip() for name in record]
    for number, name in enumerate(names, start=1):
        if not name:
            raise CatalogError(f"{source} line {line}: column {number} of the header has no name")
        if name in names[: number - 1]:
            raise CatalogError(f"{source} line {line}: the header names {name!r} twice")
    return names


def read_catalog(path: Path) -> Catalog:
    """The CSV's data rows (header name -> text), blank lines skipped; CatalogError for a file that is not
    UTF-8, has no header or no rows, or a row whose field count is not the header's."""
    source, header, rows, lines = path.name, None, [], []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(f)
            start = 1
            for record in reader:
                line, start = start, reader.line_num + 1
                if not any(field.strip() for field in record):
                    continue  # a blank line, or a row of empty cells
                if header is None:
                    header = _header(record, source, line)
                elif len(record) != len(header):
                    raise CatalogError(f"row {len(rows) + 1} (line {line} of {source}): {len(record)} fields, but "
                                       f"the header names {len(header)} (quote a field that holds a comma)",
                                       len(rows) + 1)
                else:
                    rows.append(dict(zip(header, record, strict=True)))
                    lines.append(line)
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{source}: not UTF-8 text (byte {exc.start}); save it as 'CSV UTF-8'") from None
    except csv.Error as exc:
        raise CatalogError(f"{source} line {start}: {exc}") from None
    if header is None or not rows:
        raise CatalogError(f"{source}: no data rows (the first line names the columns, each later line is a row)")
    return Catalog(rows, columns=header, lines=lines, source=source)


def read_jsonl(path: Path | None) -> list[dict[str, Any]]:
    """The batch lines ({"custom_id", ...}) of a JSONL file; [] for None or a file that does not exist (a
    batch with no failures has no error file). CatalogError naming the line for one that is not a batch line."""
    if path is None or not path.exists():
        return []
    return [item for _, item in batch_lines(path, CatalogError, label=path.name)]


# ---- templates


class _UndefinedName(jinja2.UndefinedError):
    """The template used `name` on `owner` (jinja2.utils.missing: a top-level name), which is undefined."""

    def __init__(self, name: str | None, owner: Any, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.owner = owner


class _NamingUndefined(jinja2.StrictUndefined):
    """StrictUndefined whose error says which name was missing: jinja2 raises `exc(message)`."""

    __slots__ = ()

    def __init__(self, hint: str | None = None, obj: Any = missing, name: str | None = None,
                 exc: type[jinja2.TemplateRuntimeError] = jinja2.UndefinedError) -> None:
        if exc is jinja2.UndefinedError:  # the sandbox passes SecurityError for an unsafe attribute: kept
            exc = partial(_UndefinedName, name, obj)  # type: ignore[assignment]
        super().__init__(hint, obj, name, exc)


_ENV = ImmutableSandboxedEnvironment(undefined=_NamingUndefined, trim_blocks=True, lstrip_blocks=True)


@lru_cache(maxsize=256)
def _compiled(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def _compile(source: str, what: str) -> jinja2.Template:
    try:
        return _compiled(source)
    except jinja2.TemplateSyntaxError as exc:
        raise CatalogError(f"{what} does not compile: line {exc.lineno}: {exc.message}") from None


def _where(rows: Sequence[Mapping[str, str]], number: int, source: str | None) -> str:
    """'row 3 (line 4 of catalog.csv)'; for rows that are not a Catalog, a header line then one line per row."""
    if isinstance(rows, Catalog):
        return f"row {number} (line {rows.lines[number - 1]} of {source or rows.source})"
    return f"row {number} (line {number + 1} of {source or 'the catalog'})"


def _render(template: jinja2.Template, row: Mapping[str, str], number: int, where: str, what: str) -> str:
    try:
        return template.render({**row, "row": row})
    except _UndefinedName as exc:
        if exc.owner is missing or exc.owner is row:  # `materal` or `row.materal` / `row["materal"]`
            raise CatalogError(f"{where}: {what} uses {exc.name!r}, which is not a column "
                               f"(columns: {', '.join(row)})", number) from None
        raise CatalogError(f"{where}: {what} failed: {exc}", number) from None
    except Exception as exc:  # a template raises what its expressions do: {{ price_usd + 1 }} is a TypeError
        raise CatalogError(f"{where}: {what} failed: {exc}", number) from None


def _render_values(value: Any, row: Mapping[str, str], number: int, where: str, path: str) -> Any:
    """value with every string rendered as a template; a list item that renders blank is dropped (a row
    with no material requires nothing, where [""] would be an invalid constraint)."""
    if isinstance(value, str):
        return _render(_compile(value, path), row, number, where, path) if "{" in value else value
    if isinstance(value, list):
        rendered = [_render_values(v, row, number, where, f"{path}[{i}]") for i, v in enumerate(value)]
        return [r for r, v in zip(rendered, value, strict=True)
                if not (isinstance(v, str) and v.strip() and isinstance(r, str) and not r.strip())]
    if isinstance(value, dict):
        return {k: _render_values(v, row, number, where, f"{path}.{k}") for k, v in value.items()}
    return value


# ---- build


def catalog_ids(rows: Sequence[Mapping[str, str]], custom_id_column: str | None, *,
                source: str | None = None) -> list[str]:
    """Each row's custom_id: its custom_id_column (stripped), or "row-<n>" (1-based) when that is None;
    CatalogError for no rows, an unknown column, or an empty or repeated id."""
    if not rows:
        raise CatalogError(f"{source or 'the catalog'}: no data rows")
    if custom_id_column is None:
        return [f"row-{number}" for number in range(1, len(rows) + 1)]
    columns = rows.columns if isinstance(rows, Catalog) else list(rows[0])
    if custom_id_column not in columns:
        raise CatalogError(f"there is no column {custom_id_column!r} for the custom ids "
                           f"(columns: {', '.join(columns)})")
    ids: list[str] = []
    first: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        custom_id = (row.get(custom_id_column) or "").strip()
        if not custom_id:
            raise CatalogError(f"{_where(rows, number, source)}: empty {custom_id_column} (each row's "
                               f"{custom_id_column} is its custom_id)", number)
        if custom_id in first:
            raise CatalogError(f"{_where(rows, number, source)}: {custom_id_column} {custom_id!r} repeats "
                               f"{_where(rows, first[custom_id], source)}", number)
        first[custom_id] = number
        ids.append(custom_id)
    return ids


def build_batch(rows: Sequence[Mapping[str, str]], template: str, *, system: str | None = None,
                custom_id_column: str | None = None, n: int | None = None,
                constraints: dict[str, Any] | None = None, body_extra: dict[str, Any] | None = None,
                model: str = DEFAULT_MODEL, source: str | None = None) -> list[dict[str, Any]]:
    """One batch line {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"} per row, the
    user message rendered from template (the row's columns are its variables, and the row is `row`);
    body: model, messages, body_extra's fields, then n and the row's constraints when given. CatalogError
    for the first row that cannot be built; source names the file in messages (default: the Catalog's)."""
    user = _compile(template, "the template")
    ids = catalog_ids(rows, custom_id_column, source=source)
    lines = []
    for number, (row, custom_id) in enumerate(zip(rows, ids, strict=True), start=1):
        where = _where(rows, number, source)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": _render(user, row, number, where, "the template")})
        body: dict[str, Any] = {"model": model, "messages": messages, **(body_extra or {})}
        if n is not None:
            body["n"] = n
        if constraints is not None:
            body["constraints"] = _render_values(constraints, row, number, where, "constraints")
        lines.append({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
    return lines


def write_jsonl(lines: Iterable[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def batch_file_from_csv(csv_path: Path, template_path: Path, out_path: Path, **options: Any) -> int:
    """Writes the batch file for a catalog CSV and a template file (options: build_batch's, the system
    prompt as text); returns its line count. Every row renders before out_path is opened: a CatalogError
    leaves no file."""
    template = _read_text(template_path)
    _compile(template, template_path.name)  # a syntax error names the file; build_batch finds it compiled
    lines = build_batch(read_catalog(csv_path), template, **options)
    write_jsonl(lines, out_path)
    return len(lines)


# ---- join


@dataclass(frozen=True)
class _Result:
    texts: list[str]  # the choices' texts in index order; [] for an error
    error: str  # "" when the request succeeded


def _message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or "")
    return error if isinstance(error, str) else ""


def _choice_text(choice: dict[str, Any]) -> str:
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")  # chat or completions
    return text if isinstance(text, str) else ""


def _result_of(line: dict[str, Any]) -> _Result:
    """An output or error line: {"custom_id", "response": {"status_code", "body"} | None, "error"}."""
    response = line.get("response")
    if not isinstance(response, dict):
        return _Result([], _message(line.get("error")) or "failed")
    body = response.get("body") if isinstance(response.get("body"), dict) else {}
    status = response.get("status_code")
    if status != 200 or line.get("error"):
        return _Result([], _message(body.get("error")) or _message(line.get("error")) or f"status {status}")
    choices = [c for c in body.get("choices") or [] if isinstance(c, dict)]
    if not choices:
        return _Result([], "the response has no choices")
    choices.sort(key=lambda c: c.get("index") if isinstance(c.get("index"), int) else 0)
    return _Result([_choice_text(c) for c in choices], "")


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        return " | ".join(_cell(v) for v in value)
    return json.dumps(value, ensure_ascii=False)  # numbers, true/false, objects


def _text_cells(text: str, column: str) -> dict[str, str]:
    """{column: text}, or for a JSON object's text its top-level fields as `column.field`."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        return {column: text}
    return {f"{column}.{field}": _cell(v) for field, v in value.items()}


def join_results(rows: Sequence[Mapping[str, str]], output_lines: Iterable[dict[str, Any]],
                 error_lines: Iterable[dict[str, Any]], *, custom_id_column: str | None = None,
                 column: str = "generated", variants: Variants | str = Variants.COLUMNS,
                 ) -> tuple[list[str], list[dict[str, str]]]:
    """(fieldnames, rows): the catalog in its order with the generated text in `column` (a JSON object's
    fields in `column.field`), several choices as `column_1..n` or, variants="rows", one row per choice
    numbered in `variant`, and `error` (the error line's message; "no result" for a row no line names).
    A successful line wins over an error line for the same custom_id."""
    variants = Variants(variants)
    ids = catalog_ids(rows, custom_id_column)
    results: dict[str, _Result] = {}
    for line in [*error_lines, *output_lines]:
        custom_id = line.get("custom_id")
        result, known = _result_of(line), results.get(custom_id)
        if isinstance(custom_id, str) and (known is None or (known.error and not result.error)):
            results[custom_id] = result
    if results and not results.keys() & set(ids):
        raise CatalogError(f"no result line's custom_id is a row's (a line's: {next(iter(results))!r}, a row's: "
                           f"{ids[0]!r}): join with the custom-id column the batch was built with")
    numbered = variants is Variants.COLUMNS and max((len(results[i].texts) for i in ids if i in results),
                                                    default=1) > 1
    added: dict[str, tuple[int, int]] = {"variant": (0, 0)} if variants is Variants.ROWS else {}
    out = []
    for row, custom_id in zip(rows, ids, strict=True):
        result = results.get(custom_id) or _Result([], NO_RESULT)
        if variants is Variants.ROWS:
            expanded = [{"variant": str(i), **_text_cells(text, column)} for i, text in enumerate(result.texts, 1)]
        else:
            cells: dict[str, str] = {}
            for i, text in enumerate(result.texts, start=1):
                cells |= _text_cells(text, f"{column}_{i}" if numbered else column)
            expanded = [cells]
        for cells in expanded or [{"variant": ""}]:
            for name in cells:  # column_2.title sorts with column_2, then by first appearance
                variant = int(name[len(column) + 1:].split(".")[0]) if numbered else 0
                added.setdefault(name, (variant, len(added)))
            out.append({**row, **cells, "error": result.error})
    base = rows.columns if isinstance(rows, Catalog) else list(rows[0])
    names = [*base, *sorted(added, key=added.__getitem__), "error"]
    clash = [name for name in names[len(base):] if name in base]
    if clash:
        raise CatalogError(f"the catalog already has a column {clash[0]!r}; name the generated column otherwise")
    return names, [{name: r.get(name, "") for name in names} for r in out]


def write_csv(fieldnames: list[str], rows: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
