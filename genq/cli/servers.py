"""Commands for the deployment's own machines: the API server, Celery workers, the reaper, schema
migrations, and API keys (these talk to the database directly, not through the API)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from genq.cli.console import EXIT_INVALID_INPUT, EXIT_SYSTEM_FAILURE, console
from genq.settings import Settings, get_settings


def configuration_problems(settings: Settings) -> list[str]:
    """What makes settings unsafe for a server deployment (API, workers, reaper on their own machines);
    each would otherwise be a silent default that loses or splits work."""
    problems = []
    if settings.broker_url and not settings.database_url:
        problems.append("GENQ_BROKER_URL is set but GENQ_DATABASE_URL is not: every process would keep job state "
                        f"in its own SQLite file under {settings.home}; name the shared database (PostgreSQL)")
    if settings.resolved_storage_url().startswith("s3://"):
        import boto3

        if boto3.Session().get_credentials() is None:
            problems.append(f"GENQ_STORAGE_URL is {settings.storage_url!r} but no S3 credentials were found "
                            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or an instance role)")
    return problems


def _refuse_dangerous_configuration(settings: Settings) -> None:
    problems = configuration_problems(settings)
    for problem in problems:
        console.print(f"[red]configuration error[/]: {problem}")
    if problems:
        raise typer.Exit(EXIT_SYSTEM_FAILURE)


def api(host: Annotated[str | None, typer.Option(help="Bind address [GENQ_API_HOST].")] = None,
        port: Annotated[int | None, typer.Option(help="Port [GENQ_API_PORT].")] = None,
        migrate: Annotated[bool, typer.Option(help="Upgrade the database schema first.")] = False,
        workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1) -> None:
    """Serve the OpenAI-compatible Files and Batch API."""
    import uvicorn

    settings = get_settings()
    _refuse_dangerous_configuration(settings)
    if migrate:
        _migrate(settings)
    uvicorn.run("api.main:app", host=host or settings.api_host, port=port or settings.api_port, workers=workers)


def _migrate(settings: Settings) -> None:
    from db.migrate import upgrade_to_head

    if not settings.database_url:  # the embedded SQLite file lives under GENQ_HOME
        settings.home.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.resolved_database_url())


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


def worker(
    queues: Annotated[list[str] | None, typer.Option("--queues", "-Q", help="Queues to consume (repeatable or "
                                                     "comma-separated); default: one per served model.")] = None,
    models: Annotated[str | None, typer.Option(help="Comma-separated model ids to serve and load at start; "
                                               "default: every registry model, loaded at first use.")] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", "-c", help="Shards held at once, all "
                                                    "feeding this process's engine [GENQ_WORKER_SHARDS].")] = None,
    pool: Annotated[str, typer.Option(help="Celery pool: threads (one process, one engine per model) or "
                                      "prefork (a child per -c, each with its own engine).")] = "threads",
    reaper: Annotated[bool, typer.Option(help="Also run the reaper loop in a sibling process.")] = True,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option("--hostname", "-n", help="Celery node name.")] = None,
) -> None:
    """Run a Celery worker for model queues: one per GPU (CUDA_VISIBLE_DEVICES), holding several shards."""
    from workers import tasks
    from workers.celery_app import app as celery_app
    from workers.dispatch import queue_for_model
    from workers.registry import list_models

    settings = get_settings()
    if not settings.broker_url:
        console.print("[red]GENQ_BROKER_URL is not set[/]: a worker needs a broker (use `genq run` without one)")
        raise typer.Exit(EXIT_SYSTEM_FAILURE)
    _refuse_dangerous_configuration(settings)
    served = [m.strip() for m in models.split(",") if m.strip()] if models else []
    if models:
        tasks.PRELOAD_MODELS[:] = served
        if pool != "prefork":  # one process: load here, once (prefork loads in each child instead)
            tasks.preload_models()
    concurrency = concurrency or settings.worker_shards
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


def reaper(parent_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
           once: Annotated[bool, typer.Option(help="One pass, then exit.")] = False) -> None:
    """Re-dispatch lost shards, expire and finalize batches, every GENQ_REAPER_INTERVAL_SECONDS."""
    import logging

    from workers.reaper import reap

    logging.basicConfig(level=logging.INFO, format="%(asctime)s reaper %(levelname)s %(message)s")
    settings = get_settings()
    _refuse_dangerous_configuration(settings)
    while True:
        if parent_pid is not None and os.getppid() != parent_pid:
            return  # the worker that started us is gone
        try:
            report = reap(settings)
            if any((report.redispatched, report.expired_batches, report.finalized_batches, report.failed_shards,
                    report.deleted_files, report.deleted_batches)):
                logging.info("%s", report)
        except Exception:
            logging.exception("reaper pass failed; retrying next interval")
        if once:
            return
        time.sleep(settings.reaper_interval_seconds)


# --- keys ------------------------------------------------------------------------------------------


def keys_create(tenant: Annotated[str, typer.Option(help="Tenant name (created if new).")]) -> None:
    """Create an API key for a tenant and print it (shown only this once)."""
    from db.session import session_scope
    from db.tenants import create_api_key, create_tenant, get_tenant

    settings = get_settings()
    _migrate(settings)  # keys are often the first thing made in a new deployment
    with session_scope(settings.resolved_database_url()) as session:
        row = get_tenant(session=session, tenant=tenant) or create_tenant(session=session, name=tenant)
        key, secret = create_api_key(session=session, tenant_id=row.id)
        key_id = key.id
    console.print(f"key {key_id} for tenant {tenant!r} (store it now: it is not shown again)")
    print(secret)


def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
              prefix: Annotated[str | None, typer.Option(help="Only keys whose prefix starts so.")] = None) -> None:
    """List API keys: id, tenant, shown prefix, created, revoked (the secrets themselves are not stored)."""
    from db.session import session_scope
    from db.tenants import get_tenant, list_api_keys

    with session_scope(get_settings().resolved_database_url()) as session:
        tenant_id = None
        if tenant is not None:
            row = get_tenant(session=session, tenant=tenant)
            if row is None:
                console.print(f"[red]no tenant {tenant!r}[/]")
                raise typer.Exit(EXIT_SYSTEM_FAILURE)
            tenant_id = row.id
        keys = [(key.id, name, key.prefix, key.created_at, key.revoked_at)
                for key, name in list_api_keys(session=session, tenant_id=tenant_id, prefix=prefix)]
    table = Table()
    for column in ("id", "tenant", "prefix", "created", "revoked"):
        table.add_column(column, no_wrap=True)
    for key_id, name, shown, created, revoked in keys:
        table.add_row(key_id, name, shown + "...", _when(created), _when(revoked) if revoked else "-")
    Console(width=140).print(table)  # ids whole, even in a pipe


def _when(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def keys_revoke(key: Annotated[str, typer.Argument(help="Key id or prefix.")]) -> None:
    """Revoke an API key by id or prefix."""
    from db.session import session_scope
    from db.tenants import revoke_api_key

    with session_scope(get_settings().resolved_database_url()) as session:
        revoked = revoke_api_key(session=session, key=key)
    if not revoked:
        console.print(f"[red]no live key matches {key!r}[/]")
        raise typer.Exit(EXIT_SYSTEM_FAILURE)
    console.print(f"revoked {revoked} key(s); API processes refuse it within "
                  f"{get_settings().api_key_cache_seconds:g} s (their key cache)")

def export(model: Annotated[str, typer.Argument(help="A fine-tuned model id (ft:...) or one of its checkpoints.")],
           merged: Annotated[Path, typer.Option("--merged", help="Directory to write the merged model to.")]) -> None:
    """Write a fine-tuned model with its adapter merged as a Hugging Face safetensors directory
    (config.json, model.safetensors, tokenizer files) that transformers and genq both load."""
    from workers.fine_tuning.serving import export_merged
    from workers.runtime.errors import ModelLoadError

    try:
        directory = export_merged(model, merged, get_settings())
    except ModelLoadError as exc:
        console.print(f"[red]{exc.path}: {exc.problem}[/]")
        raise typer.Exit(EXIT_INVALID_INPUT) from None
    console.print(f"wrote {model} to {directory}")
