"""`genq catalog build` (CSV + template -> batch JSONL) and `genq catalog join` (CSV + results -> CSV)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from genq.catalog import CatalogError, build_batch, join_results, read_catalog, read_jsonl, write_csv, write_jsonl
from genq.cli.console import EXIT_INVALID_INPUT, console, errors_path

app = typer.Typer(no_args_is_help=True, help="Catalogs in and out: CSV rows to batch lines, results back to CSV.")

IdColumn = Annotated[str | None, typer.Option("--custom-id-column", help="The column of each row's custom_id "
                                              "(default: row-1, row-2...).")]


def _json_option(text: str | None, name: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        console.print(f"[red]{name} is not JSON: {exc}[/]")
        raise typer.Exit(EXIT_INVALID_INPUT) from None
    if not isinstance(value, dict):
        console.print(f"[red]{name} must be a JSON object[/]")
        raise typer.Exit(EXIT_INVALID_INPUT)
    return value


@app.command()
def build(
    catalog: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The catalog (CSV with a header).")],
    template: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="jinja2 user message; columns are "
                                           "its variables.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The batch input file to write (JSONL).")],
    system: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="A system prompt file.")] = None,
    custom_id_column: IdColumn = None,
    n: Annotated[int | None, typer.Option(help="Choices (variants) per product.")] = None,
    constraints: Annotated[str | None, typer.Option(help="constraints JSON; its strings are templates.")] = None,
    response_format: Annotated[str | None, typer.Option(help="response_format JSON.")] = None,
    model: Annotated[str, typer.Option()] = "smollm2-135m-instruct",
    max_tokens: Annotated[int | None, typer.Option()] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
) -> None:
    """Render one chat request per catalog row; nothing is written unless every row renders."""
    extra = {k: v for k, v in {"max_tokens": max_tokens, "temperature": temperature,
                                "response_format": _json_option(response_format, "--response-format")}.items()
             if v is not None}
    try:
        lines = build_batch(read_catalog(catalog), template.read_text(encoding="utf-8"),
                            system=system.read_text(encoding="utf-8").strip() if system else None,
                            custom_id_column=custom_id_column, n=n,
                            constraints=_json_option(constraints, "--constraints"), body_extra=extra, model=model,
                            source=catalog.name)
    except CatalogError as exc:
        console.print(f"[red]{catalog}: {exc}[/]")
        raise typer.Exit(EXIT_INVALID_INPUT) from None
    write_jsonl(lines, output)
    console.print(f"{len(lines)} requests written to {output}")


@app.command()
def join(
    catalog: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    results: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A batch's output JSONL.")],
    errors: Annotated[Path | None, typer.Argument(help="Its errors JSONL (default: beside the output).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The enriched CSV to write.")] = Path("enriched.csv"),
    custom_id_column: IdColumn = None,
    column: Annotated[str, typer.Option(help="Name of the generated column.")] = "generated",
    variants: Annotated[str, typer.Option(help="Several choices as numbered `columns` or as `rows`.")] = "columns",
) -> None:
    """Add each product's generated text (or JSON fields) and error to the catalog, one row per product."""
    if variants not in ("columns", "rows"):
        console.print("[red]--variants must be columns or rows[/]")
        raise typer.Exit(EXIT_INVALID_INPUT)
    try:
        rows = read_catalog(catalog)
        if custom_id_column is not None and custom_id_column not in rows[0]:
            raise CatalogError(f"--custom-id-column {custom_id_column!r} is not a column")
    except CatalogError as exc:
        console.print(f"[red]{catalog}: {exc}[/]")
        raise typer.Exit(EXIT_INVALID_INPUT) from None
    errors = errors or errors_path(results)
    names, enriched = join_results(rows, read_jsonl(results), read_jsonl(errors), custom_id_column=custom_id_column,
                                   column=column, variants=variants)
    write_csv(names, enriched, output)
    failed = sum(1 for r in enriched if r["error"])
    console.print(f"{len(enriched)} rows written to {output} ({failed} with an error)")
