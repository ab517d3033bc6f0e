"""/v1/fine_tuning/jobs: create (files checked synchronously), list, retrieve, cancel, events, checkpoints."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request

from api.auth import TenantDep
from api.deps import SessionDep, SettingsDep, StoreDep
from api.errors import InvalidRequest, no_such
from api.fine_tune_service import create_fine_tune
from api.fine_tuning_schemas import (
    CheckpointList,
    CheckpointObject,
    CreateFineTuningJobRequest,
    FineTuningEventList,
    FineTuningEventObject,
    FineTuningJobList,
    FineTuningJobObject,
    checkpoint_id,
)
from db.fine_tuning import cancel, checkpoints, get_fine_tune, list_events, list_fine_tunes
from db.models import FineTuningJob
from workers.dispatch import enqueue_shards

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])
METADATA_QUERY = re.compile(r"^metadata\[(.+)\]$")
Limit = Annotated[int, Query(ge=1, le=100)]


def _tenant_job(session: SessionDep, tenant_id: str, job_id: str) -> FineTuningJob:
    job = get_fine_tune(session=session, tenant_id=tenant_id, job_id=job_id)
    if job is None:
        raise no_such("fine-tuning job", job_id, param="fine_tuning_job_id")
    return job


@router.post("/jobs", response_model=FineTuningJobObject)
def create(body: CreateFineTuningJobRequest, tenant_id: TenantDep, session: SessionDep, settings: SettingsDep,
           store: StoreDep) -> FineTuningJobObject:
    """Checks the model and files (400 naming the parameter and line), then queues the job."""
    job, shard = create_fine_tune(session=session, store=store, settings=settings, tenant_id=tenant_id, body=body)
    session.commit()
    enqueue_shards(settings, [(shard.id, shard.queue)])
    return FineTuningJobObject.from_row(job)


@router.get("/jobs", response_model=FineTuningJobList)
def list_jobs(request: Request, tenant_id: TenantDep, session: SessionDep, after: str | None = None,
              limit: Limit = 20) -> FineTuningJobList:
    """The tenant's jobs, newest first; `metadata[k]=v` keeps those whose metadata has k = v."""
    metadata = {m.group(1): value for key, value in request.query_params.items() if (m := METADATA_QUERY.match(key))}
    rows, has_more = list_fine_tunes(session=session, tenant_id=tenant_id, after=after, limit=limit,
                                     metadata=metadata or None)
    return FineTuningJobList(data=[FineTuningJobObject.from_row(row) for row in rows], has_more=has_more)


@router.get("/jobs/{job_id}", response_model=FineTuningJobObject)
def retrieve(job_id: str, tenant_id: TenantDep, session: SessionDep) -> FineTuningJobObject:
    return FineTuningJobObject.from_row(_tenant_job(session, tenant_id, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=FineTuningJobObject)
def cancel_job(job_id: str, tenant_id: TenantDep, session: SessionDep) -> FineTuningJobObject:
    """An active job becomes cancelled (a training worker stops within one step); a final one is returned as is."""
    job = cancel(session=session, tenant_id=tenant_id, job_id=job_id)
    if job is None:
        raise no_such("fine-tuning job", job_id, param="fine_tuning_job_id")
    session.commit()
    return FineTuningJobObject.from_row(job)


@router.get("/jobs/{job_id}/events", response_model=FineTuningEventList)
def events(job_id: str, tenant_id: TenantDep, session: SessionDep, after: str | None = None,
           limit: Limit = 20) -> FineTuningEventList:
    """The job's events, newest first, paged with after=<event id>."""
    _tenant_job(session, tenant_id, job_id)
    cursor = None
    if after is not None:
        number = after.removeprefix("ftevent-")
        if not number.isdigit():
            raise InvalidRequest(f"after must be an event id (ftevent-N), not {after!r}", param="after",
                                 code="invalid_value")
        cursor = int(number)
    rows, has_more = list_events(session=session, job_id=job_id, after=cursor, limit=limit)
    return FineTuningEventList(data=[FineTuningEventObject.from_row(row) for row in rows], has_more=has_more)


@router.get("/jobs/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(job_id: str, tenant_id: TenantDep, session: SessionDep, after: str | None = None,
                     limit: Limit = 10) -> CheckpointList:
    """The job's kept epoch checkpoints (the last 3), newest first; each usable as a model in a batch."""
    _tenant_job(session, tenant_id, job_id)
    rows = checkpoints(session=session, job_id=job_id)
    if after is not None:
        ids = [checkpoint_id(row) for row in rows]
        rows = rows[ids.index(after) + 1:] if after in ids else []
    return CheckpointList(data=[CheckpointObject.from_row(row) for row in rows[:limit]], has_more=len(rows) > limit)
