"""Retention: what genq deletes by itself, so that storage holds nothing no row names.

- Files past expires_at (OpenAI's expires_after on upload): the row, then its object.
- Finished batches (completed, failed, expired, cancelled) older than settings.batch_retention_seconds:
  their result-file rows, the file rows of their image lines' PNGs (stored under the batch's prefix)
  and the batch row (shards and result rows cascade), then every object under the batch's storage
  prefix (shard inputs, output and error files, PNGs, and any PNG an attempt stored but never
  committed). The input file is the user's, with its own expires_after: it is not part of the batch.
Rows go first, in one transaction, so no row ever names a deleted object; an object whose deletion
fails is logged (left unreferenced, never dangling).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import delete, func, select

from db.batches import FINAL_STATUSES
from db.models import Batch, File, Job
from db.session import session_scope
from genq.settings import Settings
from storage import StorageError, Store, store_from_settings
from storage.keys import batch_prefix
from workers.batches.finalize import output_file_id

log = logging.getLogger(__name__)
PASS_LIMIT = 200  # rows per pass: a large backlog is worked off over several passes


@dataclass
class Collected:
    files: list[str]
    batches: list[str]


def collect(settings: Settings, now: float | None = None) -> Collected:
    """One retention pass: deletes what has expired; returns the file and batch ids it deleted."""
    now = time.time() if now is None else now
    store = store_from_settings(settings)
    url = settings.resolved_database_url()
    with session_scope(url) as session:
        expired = session.execute(select(File.id, File.storage_key).where(
            File.expires_at.is_not(None), File.expires_at < now).limit(PASS_LIMIT)).all()
        session.execute(delete(File).where(File.id.in_([file_id for file_id, _ in expired])))
    for file_id, key in expired:
        _delete(store, [key], f"file {file_id}")

    batches: list[str] = []
    if settings.batch_retention_seconds > 0:
        finished_at = func.coalesce(Batch.completed_at, Batch.failed_at, Batch.expired_at, Batch.cancelled_at)
        cutoff = now - settings.batch_retention_seconds
        with session_scope(url) as session:
            candidates = list(session.scalars(select(Batch.id).where(
                Batch.status.in_(FINAL_STATUSES), finished_at < cutoff).limit(PASS_LIMIT)))
        objects = {}
        for batch_id in candidates:  # listed while rows still name them: a failed listing is retried next pass
            try:
                objects[batch_id] = list(store.list_keys(batch_prefix(batch_id)))
            except StorageError as exc:
                log.warning("retention: cannot list batch %s's objects, next pass: %s", batch_id, exc)
        batches = list(objects)
        with session_scope(url) as session:
            results = [output_file_id(batch_id, kind) for batch_id in batches for kind in ("output", "errors")]
            session.execute(delete(File).where(File.id.in_(results)))
            for batch_id in batches:  # image lines' PNGs
                session.execute(delete(File).where(File.storage_key.startswith(batch_prefix(batch_id),
                                                                               autoescape=True)))
            session.execute(delete(Job).where(Job.id.in_(batches)))  # cascades to the batch, shards, results
        for batch_id in batches:
            _delete(store, objects[batch_id], f"batch {batch_id}")
    return Collected(files=[file_id for file_id, _ in expired], batches=batches)


def _delete(store: Store, keys: list[str], what: str) -> None:
    for key in keys:
        try:
            store.delete(key)
        except StorageError as exc:
            log.warning("%s deleted, but its object %s remains: %s", what, key, exc)
