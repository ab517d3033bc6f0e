"""Finalizing a batch exactly once: the output and error files, usage, and the final status.

`maybe_finalize` claims the batch with a conditional UPDATE (in_progress or cancelling -> finalizing,
only when no shard is queued or running), so of any number of concurrent callers one proceeds.
Requests that never got a result get an error line of their own (genq extension; OpenAI writes
nothing for them), so that request_counts.completed + failed == total and users can resubmit exactly
the error file's custom_ids:
  - batch_cancelled: the batch was cancelled before the request ran;
  - batch_expired: the completion window passed first (the reaper sets expired_at);
  - worker_failed: its shard failed max_attempts times (the message says why).
The final status is cancelled (cancelling_at set), expired (expired_at set), failed (every shard
failed and nothing succeeded), else completed. Output lines are ordered by input line number.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from db.batches import (
    claim_finalizing,
    count_finalize_failure,
    finish_finalizing,
    reclaim_stale_finalizing,
    usage_body,
)
from db.files import BATCH_OUTPUT_PURPOSE
from db.leases import ResultRow, cancel_queued_shards, record_unfenced_results
from db.models import Batch, BatchStatus, File, RequestOutcome, RequestResult, Shard, ShardStatus
from db.session import insert_ignoring_conflicts, session_scope
from genq.settings import Settings
from storage import StorageError, StorageKeyNotFound, Store, store_from_settings
from storage.keys import batch_result_key
from workers.batches.chat import batch_error_line, stable_id
from workers.batches.shard_files import read_shard_lines

log = logging.getLogger(__name__)

MISSING_REASONS = {
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
    "batch_expired": "This request could not be executed before the completion window expired.",
}


def _now() -> float:
    return time.time()


def maybe_finalize(settings: Settings, batch_id: str) -> bool:
    """Finalizes the batch if its work is over and nobody else is doing it; True if this call did."""
    url = settings.resolved_database_url()
    with session_scope(url) as session:
        row = session.execute(select(Batch.status, Batch.expired_at).where(Batch.id == batch_id)).first()
        if row is None or row.status not in (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING):
            return False
        if row.status == BatchStatus.CANCELLING or row.expired_at is not None:
            cancel_queued_shards(session=session, job_id=batch_id)
        claimed = claim_finalizing(session=session, batch_id=batch_id)
    if claimed:
        _finalize_or_give_up(settings, batch_id)
    return claimed


def refinalize_stale(settings: Settings, batch_id: str, older_than_seconds: float) -> bool:
    """Finalizes again a batch whose finalizer died mid-way (still finalizing after older_than_seconds)."""
    with session_scope(settings.resolved_database_url()) as session:
        claimed = reclaim_stale_finalizing(session=session, batch_id=batch_id, older_than_seconds=older_than_seconds)
    if claimed:
        _finalize_or_give_up(settings, batch_id)
    return claimed


def _finalize_or_give_up(settings: Settings, batch_id: str) -> None:
    """finalize_batch; when it raises, counts the failure, and at max_attempts fails the batch with the
    error (result rows stay readable through /partial), so no batch waits in finalizing forever."""
    try:
        finalize_batch(settings, batch_id)
        return
    except Exception as exc:
        outage = isinstance(exc, OperationalError | StorageError) and not isinstance(exc, StorageKeyNotFound)
        log.exception("finalizing batch %s failed%s", batch_id, "; a dependency is down" if outage else "")
        if outage:  # not this batch's fault: the reaper tries again, uncounted
            return
        error = type(exc).__name__  # the tenant reads batch.errors: no SQL, keys or paths from the message
    with session_scope(settings.resolved_database_url()) as session:
        failures = count_finalize_failure(session=session, batch_id=batch_id, error=error,
                                          max_attempts=settings.max_attempts)
        if failures is not None and failures >= settings.max_attempts:
            log.error("batch %s failed: its finalization failed %d times", batch_id, failures)


def _missing_code(batch: Batch, shard: Shard) -> tuple[str, str]:
    if batch.cancelling_at is not None:
        return "batch_cancelled", MISSING_REASONS["batch_cancelled"]
    if batch.expired_at is not None:
        return "batch_expired", MISSING_REASONS["batch_expired"]
    return "worker_failed", (f"genq could not run this request: its shard stopped after {shard.attempt} "
                             f"attempt(s): {shard.last_error or 'unknown error'}")


def _fill_missing_results(session: Session, store: Store, batch: Batch) -> None:
    """Writes an error row for every request of the batch that has none."""
    for shard in session.scalars(select(Shard).where(Shard.job_id == batch.id).order_by(Shard.index)):
        if shard.succeeded + shard.failed >= shard.request_count:
            continue
        done = set(session.scalars(select(RequestResult.custom_id).where(RequestResult.shard_id == shard.id)))
        code, message = _missing_code(batch, shard)
        rows = [
            ResultRow(custom_id=item.custom_id, line_number=item.line, outcome=RequestOutcome.FAILED,
                      output_line=batch_error_line(batch_id=batch.id, custom_id=item.custom_id, code=code,
                                                   message=message, attempt=shard.attempt or None))
            for item in read_shard_lines(store, shard.input_key) if item.custom_id not in done
        ]
        record_unfenced_results(session=session, batch_id=batch.id, shard_id=shard.id, attempt=shard.attempt,
                                worker_id=None, results=rows)


def _write_lines(session: Session, store: Store, batch_id: str, outcome: RequestOutcome, key: str) -> tuple[int, int]:
    """Streams the batch's lines of one outcome to key, in input order; returns (lines, bytes)."""
    lines = 0
    with tempfile.TemporaryFile() as spool:
        query = (select(RequestResult.output_line)
                 .where(RequestResult.batch_id == batch_id, RequestResult.outcome == outcome)
                 .order_by(RequestResult.line_number))
        for line in session.scalars(query.execution_options(yield_per=1000)):
            spool.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
            lines += 1
        size = spool.tell()
        spool.seek(0)
        store.put_stream(key, spool)
    return lines, size


def _insert_file(session: Session, **values: Any) -> None:
    session.execute(insert_ignoring_conflicts(session, File, values, index_elements=["id"]))


def output_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output ("output") or error ("errors") file: fixed, so a re-run finalizer
    overwrites rather than duplicates."""
    return f"file-{stable_id(batch_id, kind)}"


def finalize_batch(settings: Settings, batch_id: str) -> None:
    """Writes the files and sets the final status of a batch this caller holds in `finalizing`."""
    url = settings.resolved_database_url()
    store = store_from_settings(settings)
    with session_scope(url) as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.status != BatchStatus.FINALIZING:
            return
        _fill_missing_results(session, store, batch)
    with session_scope(url) as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        created = int(_now())
        files: dict[str, str | None] = {}
        for kind, outcome in (("output", RequestOutcome.SUCCEEDED), ("errors", RequestOutcome.FAILED)):
            key = batch_result_key(batch_id, kind)
            lines, size = _write_lines(session, store, batch_id, outcome, key)
            if kind == "errors" and lines == 0:
                files[kind] = None  # as OpenAI: no error file when nothing failed
                store.delete(key)  # nor an empty object that no row names
                continue
            file_id = output_file_id(batch_id, kind)
            _insert_file(session, id=file_id, tenant_id=batch.tenant_id, filename=f"{batch_id}_{kind}.jsonl",
                         purpose=BATCH_OUTPUT_PURPOSE, bytes=size, created_at=created, expires_at=None, storage_key=key)
            files[kind] = file_id
        succeeded, prompt_tokens, completion_tokens = session.execute(  # the shards' counters (db/leases.py)
            select(func.coalesce(func.sum(Shard.succeeded), 0), func.coalesce(func.sum(Shard.prompt_tokens), 0),
                   func.coalesce(func.sum(Shard.completion_tokens), 0))
            .where(Shard.job_id == batch_id)
        ).one()
        failed_shards = session.scalar(select(func.count(Shard.id)).where(
            Shard.job_id == batch_id, Shard.status == ShardStatus.FAILED)) or 0
        status = finish_finalizing(
            session=session, batch=batch, output_file_id=files["output"], error_file_id=files["errors"],
            usage=usage_body(input_tokens=int(prompt_tokens), output_tokens=int(completion_tokens)),
            succeeded=int(succeeded), failed_shards=failed_shards, now=created)
        if status is None:
            session.rollback()
            return
    log.info("batch %s finalized: %s", batch_id, status)
