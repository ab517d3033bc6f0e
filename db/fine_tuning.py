"""The fine-tune kind's rows: its lifecycle as conditional UPDATEs, its events, and its tenants' models.

Statuses: queued (the files passed the checks at create; waiting for a worker) -> validating_files (a
worker prepares the data) -> running (training segments) -> succeeded | failed; cancelled from any of
the first three. Every transition here is one conditional UPDATE, so a late worker, a reaper and a
cancel never both win; worker writes are fenced by the shard's attempt (db/leases.fence).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.orm import Session

from db.ids import sortable_id
from db.leases import cancel_queued_shards, fence
from db.models import FineTunedModel, FineTuneStatus, FineTuningEvent, FineTuningJob, Job, JobKind, Shard, ShardStatus

ACTIVE_STATUSES = (FineTuneStatus.QUEUED, FineTuneStatus.VALIDATING_FILES, FineTuneStatus.RUNNING)
FINAL_STATUSES = (FineTuneStatus.SUCCEEDED, FineTuneStatus.FAILED, FineTuneStatus.CANCELLED)


def _now() -> int:
    return int(time.time())


def new_fine_tune_id() -> str:
    """"ftjob-" + 24 hex digits that sort by creation (OpenAI's prefix)."""
    return sortable_id("ftjob-")


def fine_tuned_model_name(*, base: str, tenant_name: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's scheme, ft:BASE:ORG:SUFFIX:ID, with the tenant as the organisation."""
    return f"ft:{base}:{tenant_name}:{suffix or ''}:{job_id.removeprefix('ftjob-')}"


def add_fine_tune(*, session: Session, job_id: str, tenant_id: str, model: str, training_file: str,
                  validation_file: str | None, method: dict[str, Any], suffix: str | None, seed: int,
                  metadata: dict[str, Any] | None, queue: str) -> tuple[FineTuningJob, Shard]:
    """Inserts the job (queued) and its one shard; the caller commits, then enqueues the shard."""
    now = _now()
    session.add(Job(id=job_id, tenant_id=tenant_id, kind=JobKind.FINE_TUNE, created_at=now))
    session.flush()
    job = FineTuningJob(id=job_id, tenant_id=tenant_id, model=model, training_file=training_file,
                        validation_file=validation_file, method=method, hyperparameters={}, suffix=suffix,
                        seed=seed, metadata_=metadata, status=FineTuneStatus.QUEUED, result_files=[],
                        created_at=now)
    session.add(job)
    session.flush()
    shard = Shard(job_id=job_id, index=0, model=model, queue=queue, input_key=training_file, request_count=0,
                  status=ShardStatus.QUEUED, attempt=0, created_at=time.time(), updated_at=time.time())
    session.add(shard)
    session.flush()
    add_event(session=session, job_id=job_id, message="Created fine-tuning job")
    return job, shard


def job_runs() -> ColumnElement[bool]:
    """claim_shard's condition for a fine-tune's shard: its job is not final."""
    return select(FineTuningJob.id).where(FineTuningJob.id == Shard.job_id,
                                          FineTuningJob.status.in_(ACTIVE_STATUSES)).exists()


def get_fine_tune(*, session: Session, tenant_id: str, job_id: str) -> FineTuningJob | None:
    """The tenant's job, or None (also for another tenant's)."""
    return session.scalars(select(FineTuningJob).where(FineTuningJob.id == job_id,
                                                       FineTuningJob.tenant_id == tenant_id)).first()


def list_fine_tunes(*, session: Session, tenant_id: str, after: str | None, limit: int,
                    metadata: dict[str, str] | None = None) -> tuple[list[FineTuningJob], bool]:
    """A page of the tenant's jobs, newest first, after the job id `after`; metadata filters exact values."""
    query = select(FineTuningJob).where(FineTuningJob.tenant_id == tenant_id)
    if after:
        query = query.where(FineTuningJob.id < after)  # ids sort by creation
    query = query.order_by(FineTuningJob.id.desc())
    if not metadata:
        rows = list(session.scalars(query.limit(limit + 1)))
    else:  # JSON comparison differs between SQLite and PostgreSQL: filtered here, over the tenant's jobs
        rows = [r for r in session.scalars(query) if all((r.metadata_ or {}).get(k) == v for k, v in metadata.items())]
    return rows[:limit], len(rows) > limit


def status_of(*, session: Session, job_id: str) -> FineTuneStatus | None:
    return session.scalar(select(FineTuningJob.status).where(FineTuningJob.id == job_id))


def _move(session: Session, job_id: str, from_: tuple[FineTuneStatus, ...], **values: Any) -> bool:
    return session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id, FineTuningJob.status.in_(from_))
                           .values(**values)).rowcount == 1


def start_preparing(*, session: Session, job_id: str) -> bool:
    """queued -> validating_files (a worker claimed it); a resumed attempt finds it there or running."""
    _move(session, job_id, (FineTuneStatus.QUEUED,), status=FineTuneStatus.VALIDATING_FILES, started_at=_now())
    return status_of(session=session, job_id=job_id) in ACTIVE_STATUSES


def start_running(*, session: Session, shard_id: int, attempt: int, job_id: str, hyperparameters: dict[str, Any],
                  total_steps: int) -> bool:
    """validating_files -> running with the resolved hyperparameters; False when the lease was lost."""
    if not fence(session=session, shard_id=shard_id, attempt=attempt):
        return False
    _move(session, job_id, (FineTuneStatus.VALIDATING_FILES,), status=FineTuneStatus.RUNNING,
          hyperparameters=hyperparameters, total_steps=total_steps)
    return status_of(session=session, job_id=job_id) == FineTuneStatus.RUNNING


def record_segment(*, session: Session, shard_id: int, attempt: int, job_id: str, step: int, resume_key: str,
                   trained_tokens: int, estimated_finish: int | None) -> bool:
    """A finished segment's resumable state is in storage: point the job at it. False: lease lost."""
    if not fence(session=session, shard_id=shard_id, attempt=attempt):
        return False
    session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id).values(
        step=step, resume_key=resume_key, trained_tokens=trained_tokens, estimated_finish=estimated_finish))
    return True


def succeed(*, session: Session, shard_id: int, attempt: int, job_id: str, fine_tuned_model: str,
            trained_tokens: int, result_files: list[str]) -> bool:
    """running -> succeeded with its model and result files; False when the lease was lost or it was cancelled."""
    if not fence(session=session, shard_id=shard_id, attempt=attempt):
        return False
    return _move(session, job_id, (FineTuneStatus.RUNNING,), status=FineTuneStatus.SUCCEEDED,
                 fine_tuned_model=fine_tuned_model, trained_tokens=trained_tokens, result_files=result_files,
                 finished_at=_now(), estimated_finish=None)


def fail(*, session: Session, job_id: str, code: str, message: str, param: str | None = None) -> bool:
    """Any active status -> failed with an OpenAI error object (a bad file, a crash past max_attempts)."""
    failed = _move(session, job_id, ACTIVE_STATUSES, status=FineTuneStatus.FAILED, finished_at=_now(),
                   estimated_finish=None, error={"code": code, "message": message, "param": param})
    if failed:
        add_event(session=session, job_id=job_id, level="error", message=message)
    return failed


def cancel(*, session: Session, tenant_id: str, job_id: str) -> FineTuningJob | None:
    """Active -> cancelled (a running worker stops at its next step check); idempotent; None if unknown."""
    job = get_fine_tune(session=session, tenant_id=tenant_id, job_id=job_id)
    if job is None:
        return None
    if _move(session, job_id, ACTIVE_STATUSES, status=FineTuneStatus.CANCELLED, finished_at=_now(),
             estimated_finish=None):
        cancel_queued_shards(session=session, job_id=job_id)
        add_event(session=session, job_id=job_id, message="Fine-tuning job cancelled")
    session.refresh(job)
    return job


def add_event(*, session: Session, job_id: str, message: str, level: str = "info", type: str = "message",  # noqa: A002
              data: dict[str, Any] | None = None) -> None:
    session.add(FineTuningEvent(job_id=job_id, created_at=_now(), level=level, type=type, message=message,
                                data=data))
    session.flush()


def list_events(*, session: Session, job_id: str, after: int | None, limit: int) -> tuple[list[FineTuningEvent], bool]:
    """Events newest first; `after` is an event's number (from "ftevent-N"), the page continues below it."""
    query = select(FineTuningEvent).where(FineTuningEvent.job_id == job_id)
    if after is not None:
        query = query.where(FineTuningEvent.id < after)
    rows = list(session.scalars(query.order_by(FineTuningEvent.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# --- fine-tuned models ---------------------------------------------------------------------------


def add_model(*, session: Session, model_id: str, tenant_id: str, job_id: str, base_model: str, adapter_key: str,
              checkpoint_step: int | None, metrics: dict[str, Any] | None,
              image_spec: dict[str, Any] | None = None) -> None:
    session.add(FineTunedModel(id=model_id, tenant_id=tenant_id, job_id=job_id, base_model=base_model,
                               adapter_key=adapter_key, checkpoint_step=checkpoint_step, metrics=metrics,
                               image_spec=image_spec, created_at=_now()))
    session.flush()


def tenant_model(*, session: Session, tenant_id: str, model_id: str) -> FineTunedModel | None:
    """The tenant's fine-tuned model or checkpoint with this name, or None (also another tenant's)."""
    return session.scalars(select(FineTunedModel).where(FineTunedModel.id == model_id,
                                                        FineTunedModel.tenant_id == tenant_id)).first()


def any_model(*, session: Session, model_id: str) -> FineTunedModel | None:
    """The fine-tuned model with this name, whoever owns it (a worker loading a shard's model)."""
    return session.get(FineTunedModel, model_id)


def tenant_models(*, session: Session, tenant_id: str, checkpoints: bool = True) -> list[FineTunedModel]:
    query = select(FineTunedModel).where(FineTunedModel.tenant_id == tenant_id)
    if not checkpoints:
        query = query.where(FineTunedModel.checkpoint_step.is_(None))
    return list(session.scalars(query.order_by(FineTunedModel.created_at, FineTunedModel.id)))


def checkpoints(*, session: Session, job_id: str) -> list[FineTunedModel]:
    """The job's epoch checkpoints, newest first."""
    return list(session.scalars(select(FineTunedModel).where(
        FineTunedModel.job_id == job_id, FineTunedModel.checkpoint_step.is_not(None))
        .order_by(FineTunedModel.checkpoint_step.desc())))


def prune_checkpoints(*, session: Session, job_id: str, keep: int) -> list[str]:
    """Deletes all but the newest `keep` checkpoints; returns their adapter keys (for the store)."""
    old = checkpoints(session=session, job_id=job_id)[keep:]
    if old:
        session.execute(delete(FineTunedModel).where(FineTunedModel.id.in_([m.id for m in old])))
    return [m.adapter_key for m in old]


def delete_model(*, session: Session, tenant_id: str, model_id: str) -> FineTunedModel | None:
    """Removes the tenant's final fine-tuned model (not a checkpoint of a running job); None if unknown."""
    model = tenant_model(session=session, tenant_id=tenant_id, model_id=model_id)
    if model is not None:
        session.delete(model)
        session.flush()
    return model


def fail_orphaned(*, session: Session, job_ids: list[str] | None = None) -> list[str]:
    """Active jobs (all, or those of job_ids) whose shard failed or was cancelled for good (its workers
    kept dying past max_attempts) -> failed with the shard's last error; returns their ids. The reaper's
    pass, and a worker's at once when it is the one that saw the last attempt end."""
    query = (select(FineTuningJob.id, Shard.last_error).join(Shard, Shard.job_id == FineTuningJob.id)
             .where(FineTuningJob.status.in_(ACTIVE_STATUSES),
                    Shard.status.in_((ShardStatus.FAILED, ShardStatus.CANCELLED))))
    if job_ids is not None:
        query = query.where(FineTuningJob.id.in_(job_ids))
    return [job_id for job_id, error in session.execute(query).all()
            if fail(session=session, job_id=job_id, code="worker_failed",
                    message=f"Training stopped and could not be resumed: {error or 'worker lost'}")]
