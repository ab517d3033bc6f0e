"""`genq submit/status/results`: clients of a running API [GENQ_API_BASE], through the official openai SDK."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from genq.cli.console import EXIT_INVALID_INPUT, EXIT_SYSTEM_FAILURE, console, errors_path, progress_bar
from genq.settings import get_settings

FINAL_STATUSES = {"completed", "failed", "expired", "cancelled"}


def _client() -> Any:
    from openai import OpenAI

    settings = get_settings()
    key = settings.client_api_key()
    if not key:
        console.print("[red]no API key[/]: set GENQ_API_KEY (or OPENAI_API_KEY); `genq keys create` makes one")
        raise typer.Exit(EXIT_SYSTEM_FAILURE)
    return OpenAI(base_url=settings.client_base_url(), api_key=key)


@contextmanager
def _api_errors() -> Iterator[None]:
    """Turns SDK errors into one line and exit status 1 (2 for a rejected input file)."""
    import openai

    try:
        yield
    except openai.BadRequestError as exc:
        console.print(f"[red]{exc.message}[/]")
        raise typer.Exit(EXIT_INVALID_INPUT) from None
    except openai.APIStatusError as exc:
        console.print(f"[red]{exc.status_code}: {exc.message}[/]")
        raise typer.Exit(EXIT_SYSTEM_FAILURE) from None
    except openai.APIConnectionError as exc:
        console.print(f"[red]cannot reach {get_settings().client_base_url()}: {exc}[/]")
        raise typer.Exit(EXIT_SYSTEM_FAILURE) from None


def _counts(batch: Any) -> tuple[int, int, int]:
    counts = batch.request_counts
    return (counts.total, counts.completed, counts.failed) if counts else (0, 0, 0)


def _watch(client: Any, batch_id: str, interval: float = 2.0) -> Any:
    """Polls the batch with a progress bar until it reaches a final status; returns it."""
    batch = client.batches.retrieve(batch_id)
    with progress_bar() as progress:
        total, completed, failed = _counts(batch)
        task = progress.add_task(batch.status, total=total or None, tokens=0)
        while True:
            total, completed, failed = _counts(batch)
            tokens = (batch.usage.output_tokens if getattr(batch, "usage", None) else 0) or 0
            progress.update(task, description=batch.status, total=total or None, completed=completed + failed,
                            tokens=tokens)
            if batch.status in FINAL_STATUSES:
                return batch
            time.sleep(interval)
            batch = client.batches.retrieve(batch_id)


def _summary(batch: Any) -> None:
    total, completed, failed = _counts(batch)
    console.print(f"batch {batch.id}: {batch.status}; {completed} succeeded, {failed} failed of {total}; "
                  f"output {batch.output_file_id or '-'}, errors {batch.error_file_id or '-'}")


def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="OpenAI batch input (JSONL).")],
    endpoint: Annotated[str | None, typer.Option(help="Batch endpoint; default: the first line's url.")] = None,
    completion_window: Annotated[str, typer.Option(help="e.g. 24h, 72h, 7d.")] = "24h",
    wait: Annotated[bool, typer.Option(help="Show progress until the batch finishes.")] = False,
) -> None:
    """Upload a batch file to the API [GENQ_API_BASE] and create the batch; prints its id."""
    if endpoint is None:
        with file.open("rb") as f:
            first = next((raw for raw in f if raw.strip()), b"{}")
        try:
            endpoint = json.loads(first).get("url") or "/v1/chat/completions"
        except ValueError:
            endpoint = "/v1/chat/completions"
    client = _client()
    with _api_errors():
        with file.open("rb") as f:
            uploaded = client.files.create(file=f, purpose="batch")
        # The SDK retries a POST whose answer was lost; the key makes the retry return the same batch.
        # It names this upload, so submitting the same file again (a new upload) still makes a new batch.
        key = hashlib.sha256(f"{uploaded.id}\n{endpoint}\n{completion_window}".encode()).hexdigest()
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,
                                      completion_window=completion_window, extra_headers={"Idempotency-Key": key})
        print(batch.id, flush=True)
        if wait:
            _summary(_watch(client, batch.id))


def status(batch_id: Annotated[str | None, typer.Argument(help="A batch id; none lists recent batches.")] = None,
           watch: Annotated[bool, typer.Option(help="Follow a batch until it finishes.")] = True) -> None:
    """Show a batch's progress live (or list recent batches)."""
    client = _client()
    with _api_errors():
        _status(client, batch_id, watch)


def _status(client: Any, batch_id: str | None, watch: bool) -> None:
    if batch_id is None:
        table = Table()
        table.add_column("id", no_wrap=True)
        for name in ("status", "done", "failed", "total", "created"):
            table.add_column(name)
        for batch in client.batches.list(limit=20).data:
            total, completed, failed = _counts(batch)
            table.add_row(batch.id, batch.status, str(completed), str(failed), str(total),
                          time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch.created_at)))
        Console().print(table)
        return
    batch = _watch(client, batch_id) if watch else client.batches.retrieve(batch_id)
    _summary(batch)


def results(batch_id: Annotated[str, typer.Argument(help="A finished batch.")],
            output: Annotated[Path | None, typer.Option("--output", "-o", help="Default: BATCH.output.jsonl; "
                                                        "errors go to *.errors.jsonl next to it.")] = None) -> None:
    """Download a batch's output (and error) file."""
    client = _client()
    with _api_errors():
        _results(client, batch_id, output)


def _results(client: Any, batch_id: str, output: Path | None) -> None:
    batch = client.batches.retrieve(batch_id)
    if batch.status not in FINAL_STATUSES:
        console.print(f"batch {batch_id} is {batch.status}; results come when it finishes (`genq status {batch_id}`)")
        raise typer.Exit(EXIT_SYSTEM_FAILURE)
    output = output or Path(f"{batch_id}.output.jsonl")
    output.parent.mkdir(parents=True, exist_ok=True)
    for file_id, path in ((batch.output_file_id, output), (batch.error_file_id, errors_path(output))):
        if file_id:
            client.files.content(file_id).write_to_file(path)
            console.print(f"{path}")
    _summary(batch)


