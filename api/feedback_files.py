"""Makes a fine-tune file of a batch's feedback, stored and recorded as an upload of purpose "fine-tune".

The ratings are joined with the batch's results (db.feedback); each request's messages come from the
batch's own shard files (the input file is the user's and may be gone); genq.feedback_export turns
them into DPO or supervised lines.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

from sqlalchemy.orm import Session

from api.errors import InvalidRequest
from db.feedback import RatedResult, ratings_with_results
from db.files import FINE_TUNE_PURPOSE, create_file, file_storage_key, new_file_id
from db.models import Batch, File
from genq.feedback_export import (
    ExportFormat,
    RatedLine,
    build_examples,
    output_content,
    request_messages,
    training_jsonl,
)
from genq.settings import Settings
from storage import StorageError, Store
from workers.batches.shard_files import read_shard_lines


def export_feedback_file(*, session: Session, store: Store, settings: Settings, batch: Batch,
                         export_format: ExportFormat, filename: str | None) -> File:
    """Writes and records (committed) the batch's feedback as a fine-tune file; InvalidRequest
    no_feedback_pairs when no rating makes an example (the message says why), export_too_large past
    settings.max_file_bytes."""
    rated = ratings_with_results(session=session, tenant_id=batch.tenant_id, batch_id=batch.id)
    if not rated:
        raise InvalidRequest(f"Batch {batch.id} has no feedback to export; rate its lines with "
                             f"POST /v1/batches/{batch.id}/feedback first.", code="no_feedback_pairs")
    bodies = _request_bodies(store, rated)
    export = build_examples([
        RatedLine(custom_id=r.custom_id, line_number=r.line_number, score=r.score, corrected=r.corrected,
                  messages=request_messages(batch.endpoint, bodies.get(r.custom_id)),
                  output=output_content(r.output_line) if r.succeeded else None)
        for r in rated], export_format)
    if not export.examples:
        raise InvalidRequest(export.why_empty(), param="format", code="no_feedback_pairs")
    data = training_jsonl(export.examples)
    if len(data) > settings.max_file_bytes:
        raise InvalidRequest(f"The {export_format.value} file would be {len(data)} bytes, more than this "
                             f"deployment's {settings.max_file_bytes}-byte file limit.", code="export_too_large")
    return _store_file(session=session, store=store, tenant_id=batch.tenant_id, data=data,
                       filename=filename or f"{batch.id}_feedback_{export_format.value}.jsonl")


def _request_bodies(store: Store, rated: list[RatedResult]) -> dict[str, Any]:
    """custom_id -> request body of the rated requests, reading each shard file they are in once."""
    wanted: dict[str, set[str]] = {}  # shard input key -> rated custom_ids in it
    for result in rated:
        wanted.setdefault(result.input_key, set()).add(result.custom_id)
    bodies = {}
    for key, custom_ids in wanted.items():
        bodies.update((line.custom_id, line.body) for line in read_shard_lines(store, key)
                      if line.custom_id in custom_ids)
    return bodies


def _store_file(*, session: Session, store: Store, tenant_id: str, data: bytes, filename: str) -> File:
    """Stores data and records it as the tenant's fine-tune file (committed); no bytes stay without a row."""
    file_id = new_file_id()
    key = file_storage_key(file_id)
    store.put_bytes(key, data)
    try:
        row = create_file(session=session, tenant_id=tenant_id, file_id=file_id, filename=filename,
                          purpose=FINE_TUNE_PURPOSE, size=len(data))
        session.commit()
    except Exception:
        with suppress(StorageError):  # the client gets the original error
            store.delete(key)
        raise
    return row
