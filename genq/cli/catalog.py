"""`genq catalog build` (CSV + template -> batch JSONL) and `genq catalog join` (CSV + results -> CSV).

The work is genq.catalog's; these commands read options and files, print, and exit 2 (EXIT_INVALID_INPUT)
with the CatalogError's message, which names the row and its line, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from genq.catalog import (
    DEFAULT_MODEL,
    CatalogError,
    Variants,
    batch_file_from_csv,
    catalog_ids,
    join_results,
    read_catalog,
    read_jsonl,
    write_csv,
)
from genq.cli.console import EXIT_INVALID_INPUT, console, errors_path

app = typer.Typer(no_args_is_help=True, help="Catalogs in and out: CSV rows to batch lines, results back to CSV.")

IdColumn = Annotated[str | None, typer.Option("--custom-id-column", help="The column of each row's custom_id "
                                              "(default: row-1, row-2... by position).")]


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]{escape(message)}[/]")  # escaped: "required[0]" is text, not markup
    return typer.Exit(EXIT_INVALID_INPUT)


def _json_object(text: str | None, option: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _fail(f"{option} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _fail(f"{option} must be a JSON object, like '{{\"max_words\": 60}}'")
    return value


def _system_prompt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise _fail(f"{path}: not UTF-8 text (byte {exc.start})") from None


@app.command()
def build(
    catalog: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The catalog (CSV with a header).")],
    template: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="jinja2 user message; the row's "
                                           "columns are its variables, the row itself is `row`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The batch input file to write (JSONL).")],
    system: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="A system prompt file.")] = None,
    custom_id_column: IdColumn = None,
    n: Annotated[int | None, typer.Option(min=1, help="Choices (variants) per product.")] = None,
    constraints: Annotated[str | None, typer.Option(help="constraints JSON; its strings are templates "
                                                    "('{\"required\": [\"{{ material }}\"]}').")] = None,
    response_format: Annotated[str | None, typer.Option(help="response_format JSON.")] = None,
    model: Annotated[str, typer.Option(help="body.model of every line.")] = DEFAULT_MODEL,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Default: the server's.")] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="Default: the server's.")] = None,
) -> None:
    """Render one chat request per catalog row; nothing is written unless every row renders."""
    extra = {"max_tokens": max_tokens, "temperature": temperature,
             "response_format": _json_object(response_format, "--response-format")}
    try:
        count = batch_file_from_csv(
            catalog, template, output, custom_id_column=custom_id_column, n=n,
            system=_system_prompt(system) if system else None,
            constraints=_json_object(constraints, "--constraints"), model=model,
            body_extra={k: v for k, v in extra.items() if v is not None})
    except CatalogError as exc:  # its message names the file (the catalog's row and line, or the template)
        raise _fail(str(exc)) from None
    console.print(f"{count} requests written to {output}; next: genq run {output}")


@app.command()
def join(
    catalog: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The catalog the batch was built "
                                            "from.")],
    results: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The batch's output JSONL.")],
    errors: Annotated[Path | None, typer.Argument(exists=True, dir_okay=False, help="Its errors JSONL (default: "
                                                  "X.errors.jsonl beside X.output.jsonl, if there).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The enriched CSV to write.")] = Path("enriched.csv"),
    custom_id_column: IdColumn = None,
    column: Annotated[str, typer.Option(help="Name of the generated column.")] = "generated",
    variants: Annotated[Variants, typer.Option(help="Several choices as numbered columns, or one row each "
                                               "(with a `variant` column).")] = Variants.COLUMNS,
) -> None:
    """Add each product's generated text (or JSON fields) and error to the catalog, in catalog order."""
    errors = errors or errors_path(results)
    try:
        rows = read_catalog(catalog)
        output_lines, error_lines = read_jsonl(results), read_jsonl(errors)
        names, enriched = join_results(rows, output_lines, error_lines, custom_id_column=custom_id_column,
                                       column=column, variants=variants)
        ids = set(catalog_ids(rows, custom_id_column))
    except CatalogError as exc:
        raise _fail(str(exc)) from None
    stray = {line["custom_id"] for line in [*output_lines, *error_lines]} - ids
    if stray:
        console.print(f"[yellow]{len(stray)} result line(s) name no row of {escape(str(catalog))} (e.g. "
                      f"{escape(repr(min(stray)))}); left out[/]")
    write_csv(names, enriched, output)
    failed = sum(1 for r in enriched if r["error"])
    console.print(f"{len(enriched)} rows written to {output} ({failed} with an error)")
