"""`genq run FILE`: a whole batch in this process, without servers.

SQLite and a local store under GENQ_HOME (or --home), the same create_batch path as the API and the
same run_shard function the workers run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import typer

from genq.cli.console import EXIT_INVALID_INPUT, EXIT_SYSTEM_FAILURE, console, errors_path, progress_bar
from genq.settings import get_settings


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


def _batch_from_catalog(catalog: Path, template: Path | None, system: Path | None) -> Path:
    """The batch file built from a catalog CSV beside it (FILE.jsonl), every row rendered first."""
    from genq.catalog import CatalogError, build_batch, read_catalog, write_jsonl

    if template is None:
        console.print(f"[red]{catalog}: a CSV needs --template (the user message for each row)[/]")
        raise typer.Exit(EXIT_INVALID_INPUT)
    try:
        lines = build_batch(read_catalog(catalog), template.read_text(encoding="utf-8"),
                            system=system.read_text(encoding="utf-8").strip() if system else None,
                            source=catalog.name)
    except CatalogError as exc:
        console.print(f"[red]{catalog}: {exc}[/]")
        raise typer.Exit(EXIT_INVALID_INPUT) from None
    out = catalog.with_suffix(".jsonl")
    write_jsonl(lines, out)
    return out


def _served_with_engines(models: list[str]) -> list[Any]:
    """The loaded models with an engine in this process (none for a runtime without one, or a model that
    does not load: run_shard reports that per shard)."""
    from workers.batches.shard_runner import default_model_loader
    from workers.registry import is_image_model

    served = []
    for model_id in models:
        if is_image_model(model_id):
            continue  # image models have no engine
        try:
            lm = default_model_loader(model_id)
        except Exception:  # noqa: BLE001 -- reported by run_shard, with the shard's attempts
            continue
        if hasattr(lm, "engine"):
            served.append(lm)
    return served


def _tick(progress: Any, task: Any, engines: list[Any], before: int, lock: threading.Lock,
          stop: threading.Event) -> None:
    """Refreshes the bar's token count from the engines twice a second until stopped."""
    while engines and not stop.wait(0.5):
        with lock:
            progress.update(task, tokens=sum(e.generated_tokens for e in engines) - before)


def run(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="OpenAI batch input (JSONL).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output JSONL; errors go next to it "
                                                "as *.errors.jsonl. Default: FILE.output.jsonl.")] = None,
    model: Annotated[str | None, typer.Option(help="Run every line on this model instead of body.model.")] = None,
    home: Annotated[Path | None, typer.Option(help="Where the embedded database and store live [GENQ_HOME].")] = None,
    template: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="With a CSV FILE: the user "
                                                  "message template (as `genq catalog build`).")] = None,
    system: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="With a CSV FILE: a system "
                                                "prompt file.")] = None,
) -> None:
    """Run a batch file (or a catalog CSV with --template) here, without servers, and write OpenAI-format
    results."""
    if file.suffix.lower() == ".csv":
        file = _batch_from_catalog(file, template, system)
    from sqlalchemy import select

    from api.batch_service import create_batch
    from api.errors import ApiError
    from db.batches import request_cancel
    from db.files import create_file, file_storage_key, new_file_id
    from db.leases import abandon_running_shards
    from db.migrate import upgrade_to_head
    from db.models import Batch, File, Shard, ShardStatus
    from db.session import session_scope
    from db.tenants import create_tenant, get_tenant
    from storage import store_from_settings
    from workers.batches.finalize import maybe_finalize
    from workers.batches.shard_runner import ShardRun, run_shard

    base = get_settings()
    home = (home or base.home).expanduser()
    # Embedded: whatever servers the environment names, this run uses only files under home.
    settings = base.model_copy(update={"home": home, "database_url": "", "storage_url": "", "broker_url": ""})
    home.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    upgrade_to_head(url)
    store = store_from_settings(settings)
    output = output or file.with_name(file.name.removesuffix(".jsonl") + ".output.jsonl")
    errors_out = errors_path(output)

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
            models = sorted({shard.model for shard in shards})
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
    # Shards run on threads, several at once, all feeding this process's one engine: the running batch
    # stays full across shard boundaries, as in a worker.
    pool = ThreadPoolExecutor(max_workers=max(1, settings.worker_shards), thread_name_prefix="shard")
    served = _served_with_engines(models)  # loaded here (run_shard would load them anyway): their counters
    engines = [lm.engine for lm in served]
    generated_before = sum(e.generated_tokens for e in engines)
    stop_ticker = threading.Event()
    interrupted = threading.Event()  # Ctrl-C: the running shards stop now, as for a cancel
    try:
        with progress_bar() as progress:
            task = progress.add_task("generating", total=total, tokens=0)
            lock = threading.Lock()

            def advance(_prompt_tokens: int, completion_tokens: int) -> None:
                with lock:
                    # Tokens as the engine generates them (live, while 256 requests run together), or as
                    # requests finish for a runtime without an engine to read.
                    tokens = (sum(e.generated_tokens for e in engines) - generated_before if engines
                              else progress.tasks[task].fields["tokens"] + completion_tokens)
                    progress.update(task, advance=1, tokens=tokens)

            ticker = threading.Thread(target=_tick, daemon=True,
                                      args=(progress, task, engines, generated_before, lock, stop_ticker))
            ticker.start()

            def run_one(shard_id: int) -> bool:
                outcome = run_shard(settings=settings, shard_id=shard_id, worker_id=worker_id, on_progress=advance,
                                    cancel=interrupted)
                if outcome.status in (ShardRun.RELEASED, ShardRun.FAILED) and outcome.error:
                    console.print(f"[yellow]shard {shard_id} attempt {outcome.attempt}: {outcome.error}[/]")
                return outcome.status != ShardRun.NOT_CLAIMED

            while True:
                # A shard still running here lost its lease (a long SQLite lock, say): run_shard claims it
                # back once the lease expires, and the attempt cap bounds the retries.
                with session_scope(url) as session:
                    unfinished = list(session.scalars(select(Shard.id).where(
                        Shard.job_id == batch_id, Shard.status.in_((ShardStatus.QUEUED, ShardStatus.RUNNING)))
                        .order_by(Shard.index)))
                if not unfinished:
                    break
                claimed = any(f.result() for f in [pool.submit(run_one, shard_id) for shard_id in unfinished])
                if not claimed:
                    time.sleep(1.0)  # waiting for a lost lease to expire
            maybe_finalize(settings, batch_id)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: cancelling; finished requests are kept[/]")
        interrupted.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with session_scope(url) as session:
            request_cancel(session=session, tenant_id=tenant_id, batch_id=batch_id)
        pool.shutdown(wait=True, cancel_futures=True)  # running shards stop within a results poll
        with session_scope(url) as session:
            abandon_running_shards(session=session, job_id=batch_id)  # this process held them
        maybe_finalize(settings, batch_id)
    finally:
        stop_ticker.set()
        pool.shutdown(wait=False, cancel_futures=True)
        for lm in served:
            lm.loop.close()  # idle before exit: a thread inside torch at interpreter exit aborts the process

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
    for engine in engines:
        console.print(f"prefix cache: {engine.stats().prefix_hit_rate:.1%} of prompt tokens served from cache")
    if "output" in outputs:
        console.print(f"results: {output}")
    if lines["errors"]:
        console.print(f"errors:  {errors_out}")
    if status in ("failed", "expired") or (status == "cancelled" and not lines["output"]):
        raise typer.Exit(EXIT_SYSTEM_FAILURE)
    if status == "cancelled":
        raise typer.Exit(130)
