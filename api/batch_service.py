"""Creating batches: the one path shared by POST /v1/batches, retry_failed and the embedded `genq run`.

The caller owns the transaction: it commits, then enqueues the returned shards with
workers.dispatch.enqueue_shards (or runs them in-process). Validation raises before any row exists.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from contextlib import nullcontext, suppress
from typing import IO, Any, BinaryIO

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.batch_input import validate_and_shard
from api.errors import Conflict, InvalidRequest, no_such
from api.limits import check_queue_caps
from db.batches import (
    FINAL_STATUSES,
    NewShard,
    add_batch,
    add_shards,
    get_batch,
    get_batch_by_idempotency_key,
    list_shards,
    new_batch_id,
    succeeded_custom_ids,
)
from db.files import create_file, file_storage_key, get_file, new_file_id
from db.models import Batch, File, Shard
from genq.settings import Settings
from storage import Store
from workers.batches.image_contract import IMAGES_ENDPOINT
from workers.batches.request_contract import ENDPOINTS
from workers.dispatch import queue_for_model
from workers.registry import image_cards, models_for_tenant

WINDOW_PATTERN = re.compile(r"^([1-9][0-9]{0,4})([hd])$")
MAX_WINDOW_SECONDS = 365 * 86400
BATCH_ENDPOINTS = (*ENDPOINTS, IMAGES_ENDPOINT)
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def completion_window_seconds(window: str) -> int:
    """Seconds in a completion window such as "24h", "1h", "72h" or "7d" (1 hour to 365 days)."""
    match = WINDOW_PATTERN.match(window)
    seconds = int(match.group(1)) * (3600 if match.group(2) == "h" else 86400) if match else 0
    if not 0 < seconds <= MAX_WINDOW_SECONDS:
        raise InvalidRequest(f"completion_window {window!r} is not supported: use hours or days such as "
                             '"24h", "1h", "72h" or "7d" (at most 365 days)',
                             param="completion_window", code="invalid_value")
    return seconds


def check_metadata(metadata: dict[str, Any] | None) -> None:
    """Raises InvalidRequest unless metadata has at most 16 string pairs of bounded length."""
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(f"metadata may hold at most {MAX_METADATA_PAIRS} pairs", param="metadata",
                             code="invalid_value")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise InvalidRequest(f"metadata keys must be at most {MAX_METADATA_KEY} characters and values "
                                 f"strings of at most {MAX_METADATA_VALUE}", param=f"metadata.{key}",
                                 code="invalid_value")


def _save_file(*, session: Session, store: Store, tenant_id: str, fileobj: IO[bytes] | BinaryIO,
               filename: str) -> File:
    """Streams fileobj into storage and records it as a new batch-purpose file of the tenant."""
    file_id = new_file_id()
    size = store.put_stream(file_storage_key(file_id), fileobj)
    return create_file(session=session, tenant_id=tenant_id, file_id=file_id, filename=filename, purpose="batch",
                       size=size)


def request_fingerprint(body: dict[str, Any]) -> str:
    """sha256 of the create body's canonical JSON: an Idempotency-Key replay must match it."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def create_batch(*, session: Session, store: Store, settings: Settings, tenant_id: str, input_file_id: str,
                 endpoint: str, completion_window: str | None = None, metadata: dict[str, Any] | None = None,
                 idempotency_key: str | None = None, fingerprint: str | None = None,
                 retried_from: str | None = None) -> tuple[Batch, list[Shard]]:
    """Validates the input file, writes its shards and inserts the batch (in_progress) and its shards (queued).

    Returns the batch and the shards to enqueue after commit. A replay of an idempotency key with the
    same fingerprint returns the existing batch and no shards; with another fingerprint it raises Conflict.
    """
    if idempotency_key:
        existing = _replay(session=session, tenant_id=tenant_id, key=idempotency_key, fingerprint=fingerprint)
        if existing is not None:
            return existing, []
    if endpoint not in BATCH_ENDPOINTS:
        raise InvalidRequest(f"endpoint {endpoint!r} is not supported; use one of {', '.join(BATCH_ENDPOINTS)}",
                             param="endpoint", code="invalid_value")
    window = completion_window or settings.completion_window_default
    window_seconds = completion_window_seconds(window)
    check_metadata(metadata)
    file = get_file(session=session, tenant_id=tenant_id, file_id=input_file_id)
    if file is None:
        raise no_such("File object", input_file_id, param="input_file_id")
    if file.purpose != "batch":
        raise InvalidRequest(f"file {input_file_id!r} has purpose {file.purpose!r}; a batch input needs 'batch'",
                             param="input_file_id", code="invalid_file_purpose")
    batch_id = new_batch_id()
    models = {spec.id: spec for spec in models_for_tenant(session, tenant_id, settings)}
    plan = validate_and_shard(store=store, settings=settings, input_key=file.storage_key, endpoint=endpoint,
                              batch_id=batch_id,
                              context_lengths={model_id: spec.context_length for model_id, spec in models.items()},
                              image_cards=image_cards(models.values()))
    # With an idempotency key, a concurrent twin may insert first: a savepoint lets us return its batch.
    guard = session.begin_nested() if idempotency_key else nullcontext()
    try:
        check_queue_caps(session=session, settings=settings, tenant_id=tenant_id, requests=plan.total,
                         tokens=plan.requested_tokens)
        with guard:
            batch = add_batch(session=session, batch_id=batch_id, tenant_id=tenant_id, input_file_id=input_file_id,
                              endpoint=endpoint, completion_window=window, model=",".join(plan.models),
                              metadata=metadata, request_total=plan.total, idempotency_key=idempotency_key,
                              fingerprint=fingerprint, retried_from=retried_from,
                              expires_in_seconds=window_seconds)
            shards = add_shards(session=session, batch_id=batch_id, shards=[
                NewShard(index=s.index, model=s.model, queue=queue_for_model(models[s.model].serving_model),
                         input_key=s.input_key,
                         request_count=s.request_count, requested_tokens=s.requested_tokens) for s in plan.shards])
    except BaseException as exc:  # a cap, a twin, the database: no row will ever name these shards
        for shard in plan.shards:
            with suppress(Exception):
                store.delete(shard.input_key)
        if not isinstance(exc, IntegrityError):
            raise
        existing = _replay(session=session, tenant_id=tenant_id, key=idempotency_key or "", fingerprint=fingerprint)
        if existing is None:
            raise
        return existing, []
    return batch, shards


def _replay(*, session: Session, tenant_id: str, key: str, fingerprint: str | None) -> Batch | None:
    existing = get_batch_by_idempotency_key(session=session, tenant_id=tenant_id, idempotency_key=key)
    if existing is not None and existing.request_fingerprint != fingerprint:
        raise Conflict(f"Idempotency-Key {key!r} was already used with a different request body",
                       param="Idempotency-Key", code="idempotency_key_reused")
    return existing


def tenant_batch(*, session: Session, tenant_id: str, batch_id: str) -> Batch:
    """The tenant's batch, or NotFound (also for another tenant's batch)."""
    batch = get_batch(session=session, tenant_id=tenant_id, batch_id=batch_id)
    if batch is None:
        raise no_such("batch", batch_id, param="batch_id")
    return batch


def retry_failed(*, session: Session, store: Store, settings: Settings, tenant_id: str, batch_id: str,
                 completion_window: str | None = None) -> tuple[Batch, list[Shard]]:
    """A new batch of the finished batch's failed and never-run requests (its input file is written first).

    Raises NotFound, Conflict (batch not finished) or InvalidRequest (nothing to retry).
    """
    source = tenant_batch(session=session, tenant_id=tenant_id, batch_id=batch_id)
    if source.status not in FINAL_STATUSES:
        raise Conflict(f"batch {batch_id!r} is {source.status.value}; only a finished batch can be retried",
                       code="batch_not_finished")
    done = succeeded_custom_ids(session=session, batch_id=batch_id)
    with tempfile.SpooledTemporaryFile(max_size=8 << 20) as buffer:  # spills to disk past 8 MiB
        lines = _write_unfinished_lines(session=session, store=store, source=source, done=done, out=buffer)
        if not lines:
            raise InvalidRequest(f"batch {batch_id!r} has no failed or unfinished requests to retry",
                                 code="nothing_to_retry")
        buffer.seek(0)
        retry_file = _save_file(session=session, store=store, tenant_id=tenant_id, fileobj=buffer,
                                filename=f"{batch_id}_retry.jsonl")
    return create_batch(session=session, store=store, settings=settings, tenant_id=tenant_id,
                        input_file_id=retry_file.id, endpoint=source.endpoint,
                        completion_window=completion_window or source.completion_window,
                        metadata=source.metadata_, retried_from=batch_id)


def _write_unfinished_lines(*, session: Session, store: Store, source: Batch, done: set[str], out: IO[bytes]) -> int:
    """Writes the source batch's requests whose custom_id is not in done as input lines; returns how many."""
    lines = 0
    for shard in list_shards(session=session, batch_id=source.id):
        with store.open_stream(shard.input_key) as stream:
            for raw in stream:
                request = json.loads(raw)
                if request["custom_id"] in done:
                    continue
                line = {"custom_id": request["custom_id"], "method": "POST", "url": source.endpoint,
                        "body": request["body"]}
                out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
                lines += 1
    return lines
