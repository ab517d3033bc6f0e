"""The `genq` command: servers (api, worker, reaper, migrate, keys), embedded runs, and API clients.

`genq run FILE` needs no servers: SQLite and a local store under GENQ_HOME (or --home), the same
create_batch path as the API and the same run_shard function the workers run, in this process.
`genq submit/status/results` talk to a running API through the official openai SDK.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from genq.settings import Settings, get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="genq: self-hosted, OpenAI-compatible batch generation.")
keys_app = typer.Typer(no_args_is_help=True, help="Create and revoke API keys.")
app.add_typer(keys_app, name="keys")
console = Console(stderr=True)

FINAL_STATUSES = {"completed", "failed", "expired", "cancelled"}
EXIT_SYSTEM_FAILURE = 1
EXIT_INVALID_INPUT = 2


# --- servers ---------------------------------------------------------------------------------------


@app.command()
def api(host: Annotated[str | None, typer.Option(help="Bind address [GENQ_API_HOST].")] = None,
        port: Annotated[int | None, typer.Option(help="Port [GENQ_API_PORT].")] = None,
        migrate: Annotated[bool, typer.Option(help="Upgrade the database schema first.")] = False,
        workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1) -> None:
    """Serve the OpenAI-compatible Files and Batch API."""
    import uvicorn

    settings = get_settings()
    if migrate:
        _migrate(settings)
    uvicorn.run("api.main:app", host=host or settings.api_host, port=port or settings.api_port, workers=workers)


def _migrate(settings: Settings) -> None:
    from db.migrate import upgrade_to_head

    upgrade_to_head(settings.resolved_database_url())


@app.command()
def migrate() -> None:
    """Bring the database [GENQ_DATABASE_URL] to the newest schema."""
    settings = get_settings()
    _migrate(settings)
    console.print(f"database at newest schema: {_redact(settings.resolved_database_url())}")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


@app.command()
def worker(
    queues: Annotated[list[str] | None, typer.Option("--queues", "-Q", help="Queues to consume (repeatable or "
                                                     "comma-separated); default: one per served model.")] = None,
    models: Annotated[str | None, typer.Option(help="Comma-separated model ids to serve and load at start; "
                                               "default: every registry model, loaded at first use.")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Pool processes; 1 per GPU.")] = 1,
    pool: Annotated[str, typer.Option(help="Celery pool; prefork keeps CUDA out of the parent.")] = "prefork",
    reaper: Annotated[bool, typer.Option(help="Also run the reaper loop in a sibling process.")] = True,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option("--hostname", "-n", help="Celery node name.")] = None,
) -> None:
    """Run a Celery worker for model queues (prefork -c 1: one per GPU, with CUDA_VISIBLE_DEVICES)."""
    from workers import tasks
    from workers.celery_app import app as celery_app
    from workers.dispatch import queue_for_model
    from workers.registry import list_models

    settings = get_settings()
    if not settings.broker_url:
        console.print("[red]GENQ_BROKER_URL is not set[/]: a worker needs a broker (use `genq run` without one)")
        raise typer.Exit(EXIT_SYSTEM_FAILURE)
    served = [m.strip() for m in models.split(",") if m.strip()] if models else []
    if models:
        tasks.PRELOAD_MODELS[:] = served  # loaded in each pool child (worker_process_init), never the parent
    names = [q.strip() for item in (queues or []) for q in item.split(",") if q.strip()]
    if not names:
        names = [queue_for_model(m) for m in (served or [spec.id for spec in list_models(settings)])]
    reaper_process = _start_reaper() if reaper else None
    argv = ["worker", "-P", pool, "-c", str(concurrency), "-Q", ",".join(names), "--loglevel", loglevel,
            "--without-mingle", "--without-gossip"]
    if hostname:
        argv += ["-n", hostname]
    try:
        celery_app.worker_main(argv)
    finally:
        if reaper_process is not None and reaper_process.poll() is None:
            reaper_process.terminate()
            try:
                reaper_process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                reaper_process.kill()


def _start_reaper() -> subprocess.Popen:
    # A sibling process, not a thread: the prefork pool forks this process and a thread holding a lock
    # at fork time would deadlock the child. Same process group, so killing the group kills it too.
    return subprocess.Popen([sys.executable, "-m", "genq.cli", "reaper", "--parent-pid", str(os.getpid())])


@app.command()
def reaper(parent_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
           once: Annotated[bool, typer.Option(help="One pass, then exit.")] = False) -> None:
    """Re-dispatch lost shards, expire and finalize batches, every GENQ_REAPER_INTERVAL_SECONDS."""
    import logging

    from workers.reaper import reap

    logging.basicConfig(level=logging.INFO, format="%(asctime)s reaper %(levelname)s %(message)s")
    settings = get_settings()
    while True:
        if parent_pid is not None and os.getppid() != parent_pid:
            return  # the worker that started us is gone
        try:
            report = reap(settings)
            if report.redispatched or report.expired_batches or report.finalized_batches or report.failed_shards:
                logging.info("%s", report)
        except Exception:
            logging.exception("reaper pass failed; retrying next interval")
        if once:
            return
        time.sleep(settings.reaper_interval_seconds)


# --- keys ------------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(tenant: Annotated[str, typer.Option(help="Tenant name (created if new).")]) -> None:
    """Create an API key for a tenant and print it (shown only this once)."""
    from db.session import session_scope
    from db.tenants import create_api_key, create_tenant, get_tenant

    settings = get_settings()
    with session_scope(settings.resolved_database_url()) as session:
        row = get_tenant(session=session, tenant=tenant) or create_tenant(session=session, name=tenant)
        key, secret = create_api_key(session=session, tenant_id=row.id)
        key_id = key.id
    console.print(f"key {key_id} for tenant {tenant!r} (store it now: it is not shown again)")
    print(secret)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="Key id or prefix.")]) -> None:
    """Revoke an API key by id or prefix."""
    from db.session import session_scope
    from db.tenants import revoke_api_key

    with session_scope(get_settings().resolved_database_url()) as session:
        revoked = revoke_api_key(session=session, key=key)
    if not revoked:
        console.print(f"[red]no live key matches {key!r}[/]")
        raise typer.Exit(EXIT_SYSTEM_FAILURE)
    console.print(f"revoked {revoked} key(s)")


# --- embedded run ----------------------------------------------------------------------------------


class _TokensPerSecond(ProgressColumn):
    def render(self, task: Any) -> Text:
        elapsed = task.elapsed or 0.0
        tokens = task.fields.get("tokens", 0)
        return Text(f"{tokens / elapsed:,.1f} tok/s" if elapsed > 0 else "- tok/s", style="progress.data.speed")


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _TokensPerSecond(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)


def _errors_path(out: Path) -> Path:
    name = out.name
    if name.endswith(".output.jsonl"):
        return out.with_name(name[: -len(".output.jsonl")] + ".errors.jsonl")
    return out.with_name((name[: -len(".jsonl")] if name.endswith(".jsonl") else name) + ".errors.jsonl")


def _copy_input(src: Path, store: Any, key: str, model: str | None) -> tuple[int, str]:
    """Stores the input file (with body.model replaced when model is given); returns (bytes, endpoint)."""
    import tempfile

    endpoint = "/v1/chat/completions"
    out = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # noqa: SIM115 -- closed below; spills to disk
    first = True
    with src.open("rb") as f:
        for raw in f:
            if first and raw.strip():
                try:
                    endpoint = json.loads(raw).get("url") or endpoint
                except (ValueError, AttributeError):
                    pass
                first = False
            if model and raw.strip():
                try:
                    line = json.loads(raw)
                    line["body"]["model"] = model
                    raw = json.dumps(line, ensure_ascii=False).encode() + b"\n"
                except (ValueError, KeyError, TypeError):
                    pass  # left as is: validation reports the line
            out.write(raw)
    size = out.tell()
    out.seek(0)
    with out:
        store.put_stream(key, out)  # type: ignore[arg-type]
    return size, endpoint


@app.command()
def run(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="OpenAI batch input (JSONL).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output JSONL; errors go next to it "
                                                "as *.errors.jsonl. Default: FILE.output.jsonl.")] = None,
    model: Annotated[str | None, typer.Option(help="Run every line on this model instead of body.model.")] = None,
    home: Annotated[Path | None, typer.Option(help="Where the embedded database and store live [GENQ_HOME].")] = None,
) -> None:
    """Run a batch file here, without servers, and write OpenAI-format results."""
    from sqlalchemy import select, update

    from api.batch_service import create_batch
    from api.errors import ApiError
    from db.batches import request_cancel
    from db.files import create_file, file_storage_key, new_file_id
    from db.migrate import upgrade_to_head
    from db.models import Batch, File, Shard, ShardStatus
    from db.session import session_scope
    from db.tenants import create_tenant, get_tenant
    from storage import store_from_settings
    from workers.finalize import maybe_finalize
    from workers.shard_runner import run_shard

    base = get_settings()
    home = (home or base.home).expanduser()
    # Embedded: whatever servers the environment names, this run uses only files under home.
    settings = base.model_copy(update={"home": home, "database_url": "", "storage_url": "", "broker_url": ""})
    home.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    upgrade_to_head(url)
    store = store_from_settings(settings)
    output = output or file.with_name(file.name.removesuffix(".jsonl") + ".output.jsonl")
    errors_out = _errors_path(output)

    with session_scope(url) as session:
        tenant = get_tenant(session=session, tenant="local") or create_tenant(session=session, name="local")
        tenant_id = tenant.id
    file_id = new_file_id()
    size, endpoint = _copy_input(file, store, file_storage_key(file_id), model)
    try:
        with session_scope(url) as session:
            create_file(session=session, tenant_id=tenant_id, file_id=file_id, filename=file.name, purpose="batch",
                        size=size)
            batch, shards = create_batch(session=session, store=store, settings=settings, tenant_id=tenant_id,
                                         input_file_id=file_id, endpoint=endpoint)
            batch_id, total = batch.id, batch.request_total
    except ApiError as exc:
        problems = getattr(exc, "errors", None)  # BatchInputInvalid: every bad line, with its number
        if problems:
            for problem in problems:  # each message names its line ("Line 7: ...")
                console.print(f"[red]{file}: {problem.message}[/]")
        else:
            console.print(f"[red]{file}: {exc.message}[/]")
        raise typer.Exit(EXIT_INVALID_INPUT) from None

    worker_id = f"embedded:{os.getpid()}"
    started = time.monotonic()
    console.print(f"batch {batch_id}: {total} requests in {len(shards)} shard(s); data in {home}")
    try:
        with _progress() as progress:
            task = progress.add_task("generating", total=total, tokens=0)

            def advance(_prompt_tokens: int, completion_tokens: int) -> None:
                tokens = progress.tasks[task].fields["tokens"] + completion_tokens
                progress.update(task, advance=1, tokens=tokens)

            while True:
                with session_scope(url) as session:
                    queued = list(session.scalars(select(Shard.id).where(
                        Shard.batch_id == batch_id, Shard.status == ShardStatus.QUEUED).order_by(Shard.index)))
                if not queued:
                    break
                for shard_id in queued:
                    outcome = run_shard(settings=settings, shard_id=shard_id, worker_id=worker_id, on_progress=advance)
                    if outcome.status in ("released", "failed") and outcome.error:
                        console.print(f"[yellow]shard {shard_id} attempt {outcome.attempt}: {outcome.error}[/]")
            maybe_finalize(settings, batch_id)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: cancelling; finished requests are kept[/]")
        with session_scope(url) as session:
            request_cancel(session=session, tenant_id=tenant_id, batch_id=batch_id)
            # This process held the running shard; nobody else will finish it.
            session.execute(update(Shard).where(Shard.batch_id == batch_id, Shard.status == ShardStatus.RUNNING)
                            .values(status=ShardStatus.CANCELLED, lease_owner=None, lease_expires_at=None))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        maybe_finalize(settings, batch_id)

    with session_scope(url) as session:
        batch = session.get(Batch, batch_id)
        outputs = {kind: session.get(File, file_id) for kind, file_id in
                   (("output", batch.output_file_id), ("errors", batch.error_file_id)) if file_id}
        status, usage = batch.status.value, batch.usage or {}
    output.parent.mkdir(parents=True, exist_ok=True)
    lines = {"output": 0, "errors": 0}
    for kind, path in (("output", output), ("errors", errors_out)):
        row = outputs.get(kind)
        if row is None:
            if path.exists() and kind == "errors":
                path.unlink()  # a stale error file from an earlier run would mislead
            continue
        with path.open("wb") as f:
            for chunk in store.iter_chunks(row.storage_key):
                f.write(chunk)
                lines[kind] += chunk.count(b"\n")
    elapsed = time.monotonic() - started
    tokens = usage.get("output_tokens", 0)
    console.print(f"batch {batch_id} {status} in {elapsed:.1f}s: {lines['output']} succeeded, {lines['errors']} "
                  f"failed; {tokens} completion tokens ({tokens / max(elapsed, 1e-9):.1f} tok/s)")
    if "output" in outputs:
        console.print(f"results: {output}")
    if lines["errors"]:
        console.print(f"errors:  {errors_out}")
    if status in ("failed", "expired") or (status == "cancelled" and not lines["output"]):
        raise typer.Exit(EXIT_SYSTEM_FAILURE)
    if status == "cancelled":
        raise typer.Exit(130)


# --- API clients -----------------------------------------------------------------------------------


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
    with _progress() as progress:
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


@app.command()
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
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,
                                      completion_window=completion_window)
        print(batch.id, flush=True)
        if wait:
            _summary(_watch(client, batch.id))


@app.command()
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


@app.command()
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
    for file_id, path in ((batch.output_file_id, output), (batch.error_file_id, _errors_path(output))):
        if file_id:
            client.files.content(file_id).write_to_file(path)
            console.print(f"{path}")
    _summary(batch)


if __name__ == "__main__":
    app()
