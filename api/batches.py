"""/v1/batches: create (validated synchronously), retrieve, list, cancel; extensions partial and retry_failed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api.auth import TenantDep
from api.batch_service import create_batch, request_fingerprint, retry_failed, tenant_batch
from api.deps import SessionDep, SettingsDep, StoreDep
from api.errors import Conflict, no_such
from api.schemas import BatchList, BatchObject, CreateBatchRequest
from db.batches import batch_progress, list_batches, request_cancel, result_page
from db.models import Batch, BatchStatus, RequestOutcome, Shard
from db.session import get_sessionmaker
from genq.settings import Settings
from workers.dispatch import enqueue_shards

router = APIRouter(prefix="/v1", tags=["batches"])
NOT_CANCELLABLE = (BatchStatus.FINALIZING, BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED)


def batch_objects(session: Session, batches: list[Batch]) -> list[BatchObject]:
    """The wire Batches with live request_counts and usage (one query for the whole list)."""
    progress = batch_progress(session=session, batches=batches)
    return [BatchObject.from_row(batch, counts=progress[batch.id][0], usage=progress[batch.id][1])
            for batch in batches]


def batch_object(session: Session, batch: Batch) -> BatchObject:
    """The wire Batch with live request_counts and usage."""
    return batch_objects(session, [batch])[0]


def _commit_and_enqueue(session: Session, settings: Settings, shards: list[Shard]) -> None:
    session.commit()
    enqueue_shards(settings, [(shard.id, shard.queue) for shard in shards])


@router.post("/batches", response_model=BatchObject)
def create(body: CreateBatchRequest, tenant_id: TenantDep, session: SessionDep, settings: SettingsDep,
           store: StoreDep, idempotency_key: Annotated[str | None, Header(max_length=256)] = None) -> BatchObject:
    """Validates the input file (400 with the line number), then records and enqueues the batch."""
    batch, shards = create_batch(
        session=session, store=store, settings=settings, tenant_id=tenant_id, input_file_id=body.input_file_id,
        endpoint=body.endpoint, completion_window=body.completion_window, metadata=body.metadata,
        idempotency_key=idempotency_key, fingerprint=request_fingerprint(body.model_dump(exclude_none=True)))
    _commit_and_enqueue(session, settings, shards)
    return batch_object(session, batch)


@router.get("/batches/{batch_id}", response_model=BatchObject)
def retrieve(batch_id: str, tenant_id: TenantDep, session: SessionDep) -> BatchObject:
    """The tenant's batch, with live counts."""
    return batch_object(session, tenant_batch(session=session, tenant_id=tenant_id, batch_id=batch_id))


@router.get("/batches", response_model=BatchList)
def list_tenant_batches(tenant_id: TenantDep, session: SessionDep, after: str | None = None,
                        limit: Annotated[int, Query(ge=1, le=100)] = 20) -> BatchList:
    """A page of the tenant's batches, newest first."""
    rows, has_more = list_batches(session=session, tenant_id=tenant_id, after=after, limit=limit)
    return BatchList(data=batch_objects(session, rows), has_more=has_more)


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject)
def cancel(batch_id: str, tenant_id: TenantDep, session: SessionDep) -> BatchObject:
    """Moves the batch to cancelling; a cancelling or cancelled batch is returned as is; a finished one is 409."""
    batch = request_cancel(session=session, tenant_id=tenant_id, batch_id=batch_id)
    if batch is None:
        raise no_such("batch", batch_id, param="batch_id")
    if batch.status in NOT_CANCELLABLE:
        raise Conflict(f"Cannot cancel a batch with status '{batch.status.value}'.", code="batch_not_cancellable")
    session.commit()
    return batch_object(session, batch)


@router.get("/batches/{batch_id}/partial", response_class=StreamingResponse)
def partial(batch_id: str, tenant_id: TenantDep, session: SessionDep, settings: SettingsDep,
            errors: bool = False) -> StreamingResponse:
    """genq extension: the output lines written so far (JSONL); errors=true gives the error lines instead."""
    tenant_batch(session=session, tenant_id=tenant_id, batch_id=batch_id)
    outcome = RequestOutcome.FAILED if errors else RequestOutcome.SUCCEEDED
    lines = _result_lines(settings.resolved_database_url(), batch_id, outcome)
    return StreamingResponse(lines, media_type="application/jsonl")


def _result_lines(database_url: str, batch_id: str, outcome: RequestOutcome) -> Iterator[bytes]:
    """Result rows as JSONL, a page at a time, each page in its own short session."""
    after_id = 0
    while True:
        with get_sessionmaker(database_url)() as session:
            page = result_page(session=session, batch_id=batch_id, outcome=outcome, after_id=after_id)
        if not page:
            return
        after_id = page[-1][0]
        yield b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for _, line in page)


@router.post("/batches/{batch_id}/retry_failed", response_model=BatchObject)
def retry(batch_id: str, tenant_id: TenantDep, session: SessionDep, settings: SettingsDep,
          store: StoreDep) -> BatchObject:
    """genq extension: a new batch (retried_from set) of a finished batch's failed and never-run requests."""
    batch, shards = retry_failed(session=session, store=store, settings=settings, tenant_id=tenant_id,
                                 batch_id=batch_id)
    _commit_and_enqueue(session, settings, shards)
    return batch_object(session, batch)
