"""The batch kind's rows: create, read, page, count, read results, and its whole lifecycle.

Every status change of a batch is one conditional UPDATE here: in_progress -> cancelling (request_cancel),
expired_at set (mark_expired, the reaper), -> finalizing (claim_finalizing, once no shard is active),
finalizing again after a dead finalizer (reclaim_stale_finalizing), -> the final status
(finish_finalizing) or failed after repeated failed finalizations (count_finalize_failure).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from db.ids import sortable_id
from db.leases import has_active_shards
from db.models import Batch, BatchStatus, Job, JobKind, RequestOutcome, RequestResult, Shard, ShardStatus

FINAL_STATUSES = (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)
CANCELLABLE_STATUSES = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)


@dataclass(frozen=True)
class NewShard:
    """A shard whose input is already in storage, to be inserted as `queued`."""

    index: int  # 0-based position within the batch
    model: str  # the model every request in it names
    queue: str  # the Celery queue of that model's workers
    input_key: str  # storage key of its JSONL request lines
    request_count: int  # lines in it
    requested_tokens: int = 0  # the most its requests may generate


@dataclass(frozen=True)
class RequestCounts:
    """A batch's progress, derived from shard and result rows (OpenAI's three fields plus two)."""

    total: int  # requests in the input file
    completed: int  # succeeded result rows (lines of the output file)
    failed: int  # failed result rows (lines of the error file)
    in_progress: int  # requests of running shards that have no result yet
    queued: int  # requests of queued shards that have no result yet

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def new_batch_id() -> str:
    """A fresh batch id, "batch_" + 24 hex digits: milliseconds then random, so ids sort by creation."""
    return sortable_id("batch_")


def add_batch(*, session: Session, batch_id: str, tenant_id: str, input_file_id: str, endpoint: str,
              completion_window: str, model: str, metadata: dict[str, Any] | None, request_total: int,
              expires_in_seconds: int | None, idempotency_key: str | None = None, fingerprint: str | None = None,
              retried_from: str | None = None) -> Batch:
    """Inserts a batch in `in_progress` (validation already passed) and returns it; the caller commits."""
    now = int(time.time())
    session.add(Job(id=batch_id, tenant_id=tenant_id, kind=JobKind.BATCH, created_at=now))
    session.flush()
    batch = Batch(id=batch_id, tenant_id=tenant_id, input_file_id=input_file_id, endpoint=endpoint,
                  completion_window=completion_window, status=BatchStatus.IN_PROGRESS, model=model[:1024],
                  metadata_=metadata, request_total=request_total, idempotency_key=idempotency_key,
                  request_fingerprint=fingerprint, retried_from=retried_from, created_at=now,
                  in_progress_at=now, expires_at=now + expires_in_seconds if expires_in_seconds else None)
    session.add(batch)
    session.flush()
    return batch


def add_shards(*, session: Session, batch_id: str, shards: list[NewShard]) -> list[Shard]:
    """Inserts the batch's shards as `queued` and returns them with their ids; the caller commits."""
    now = time.time()
    rows = [Shard(job_id=batch_id, index=s.index, model=s.model, queue=s.queue, input_key=s.input_key,
                  request_count=s.request_count, requested_tokens=s.requested_tokens, status=ShardStatus.QUEUED,
                  attempt=0, created_at=now, updated_at=now) for s in shards]
    session.add_all(rows)
    session.flush()
    return rows


def batch_runs() -> ColumnElement[bool]:
    """claim_shard's condition for a batch's shard: its batch is in_progress and not expired."""
    return select(Batch.id).where(Batch.id == Shard.job_id, Batch.status == BatchStatus.IN_PROGRESS,
                                  Batch.expired_at.is_(None)).exists()


def batch_should_stop(*, session: Session, batch_id: str) -> bool:
    """Whether a running shard of this batch should stop: cancel requested, expired, or finished."""
    row = session.execute(select(Batch.status, Batch.expired_at).where(Batch.id == batch_id)).first()
    return row is None or row.status != BatchStatus.IN_PROGRESS or row.expired_at is not None


def get_batch(*, session: Session, tenant_id: str, batch_id: str) -> Batch | None:
    """The tenant's batch with this id, or None (also for another tenant's batch)."""
    return session.scalars(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)).first()


def get_batch_by_idempotency_key(*, session: Session, tenant_id: str, idempotency_key: str) -> Batch | None:
    """The tenant's batch created with this Idempotency-Key, or None."""
    return session.scalars(
        select(Batch).where(Batch.tenant_id == tenant_id, Batch.idempotency_key == idempotency_key)
    ).first()


def list_batches(*, session: Session, tenant_id: str, after: str | None = None,
                 limit: int = 20) -> tuple[list[Batch], bool]:
    """A page of the tenant's batches, newest first, starting after the batch id `after`; and whether more follow."""
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    if after:
        cursor = get_batch(session=session, tenant_id=tenant_id, batch_id=after)
        if cursor is None:  # unknown id: compare ids alone (they sort by creation time) rather than restart
            query = query.where(Batch.id < after)
        else:
            query = query.where(or_(Batch.created_at < cursor.created_at,
                                    and_(Batch.created_at == cursor.created_at, Batch.id < cursor.id)))
    rows = list(session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def queued_work(*, session: Session, tenant_id: str) -> tuple[int, int]:
    """(requests not yet answered, tokens they may generate) in the tenant's queued and running shards.

    A running shard counts its whole token budget until it finishes (an over-count, never an under-count)."""
    requests, tokens = session.execute(
        select(func.coalesce(func.sum(Shard.request_count - Shard.succeeded - Shard.failed), 0),
               func.coalesce(func.sum(Shard.requested_tokens), 0))
        .join(Batch, Batch.id == Shard.job_id)
        .where(Batch.tenant_id == tenant_id, Shard.status.in_((ShardStatus.QUEUED, ShardStatus.RUNNING)))
    ).one()
    return int(requests), int(tokens)


def list_shards(*, session: Session, batch_id: str) -> list[Shard]:
    """The batch's shards in index order."""
    return list(session.scalars(select(Shard).where(Shard.job_id == batch_id).order_by(Shard.index)))


def request_counts(*, session: Session, batch: Batch) -> RequestCounts:
    """The batch's progress from its shards' counters: results by outcome, unanswered requests by shard status."""
    return batch_progress(session=session, batches=[batch])[batch.id][0]


def usage_totals(*, session: Session, batch: Batch) -> dict[str, Any]:
    """OpenAI batch usage: batch.usage once final, else the sum of its shards' token counters so far."""
    return batch_progress(session=session, batches=[batch])[batch.id][1]


def batch_progress(*, session: Session, batches: list[Batch]) -> dict[str, tuple[RequestCounts, dict[str, Any]]]:
    """batch id -> (request counts, usage) for every batch: one grouped read of their shards' counters
    (db/leases.py keeps them with each stored result), whatever the number of results."""
    ids = [batch.id for batch in batches]
    if not ids:
        return {}
    rows: dict[str, list[Any]] = defaultdict(list)
    for row in session.execute(
        select(Shard.job_id, Shard.status, func.sum(Shard.request_count).label("requests"),
               func.sum(Shard.succeeded).label("succeeded"), func.sum(Shard.failed).label("failed"),
               func.sum(Shard.prompt_tokens).label("prompt"), func.sum(Shard.completion_tokens).label("completion"))
        .where(Shard.job_id.in_(ids)).group_by(Shard.job_id, Shard.status)
    ):
        rows[row.job_id].append(row)
    progress = {}
    for batch in batches:
        shards = rows[batch.id]

        def unanswered(status: ShardStatus, shards: list[Any] = shards) -> int:
            return sum(max(0, int(r.requests) - int(r.succeeded) - int(r.failed)) for r in shards
                       if r.status == status)

        counts = RequestCounts(total=batch.request_total, completed=sum(int(r.succeeded) for r in shards),
                               failed=sum(int(r.failed) for r in shards), in_progress=unanswered(ShardStatus.RUNNING),
                               queued=unanswered(ShardStatus.QUEUED))
        usage = batch.usage if batch.usage is not None else usage_body(
            input_tokens=sum(int(r.prompt) for r in shards), output_tokens=sum(int(r.completion) for r in shards))
        progress[batch.id] = (counts, usage)
    return progress


def usage_body(*, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """The OpenAI `usage` object for these token totals."""
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def request_cancel(*, session: Session, tenant_id: str, batch_id: str) -> Batch | None:
    """Moves an in_progress/validating batch to cancelling (conditional UPDATE; idempotent); returns it, or None."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.tenant_id == tenant_id, Batch.status.in_(CANCELLABLE_STATUSES))
        .values(status=BatchStatus.CANCELLING, cancelling_at=int(time.time()))
        .execution_options(synchronize_session=False)
    )
    batch = get_batch(session=session, tenant_id=tenant_id, batch_id=batch_id)
    if batch is not None:
        session.refresh(batch)
    return batch


# --- the lifecycle's other transitions (the reaper's and the finalizer's), each one conditional UPDATE ---


def mark_expired(*, session: Session, batch_id: str, now: int) -> bool:
    """in_progress past its window -> expired_at set (its running shards stop at their next heartbeat)."""
    return session.execute(update(Batch).where(Batch.id == batch_id, Batch.expired_at.is_(None),
                                               Batch.status == BatchStatus.IN_PROGRESS)
                           .values(expired_at=now)).rowcount == 1


def claim_finalizing(*, session: Session, batch_id: str) -> bool:
    """in_progress or cancelling with no queued or running shard -> finalizing; True for the one caller
    that moved it (that caller writes the files)."""
    return session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_([BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING]),
               ~has_active_shards(Batch.id))
        .values(status=BatchStatus.FINALIZING, finalizing_at=int(time.time()))
    ).rowcount == 1


def reclaim_stale_finalizing(*, session: Session, batch_id: str, older_than_seconds: float) -> bool:
    """A batch finalizing for older_than_seconds (its finalizer died) is claimed again by this caller."""
    now = int(time.time())
    return session.execute(
        update(Batch).where(Batch.id == batch_id, Batch.status == BatchStatus.FINALIZING,
                            Batch.finalizing_at < now - older_than_seconds)
        .values(finalizing_at=now)
    ).rowcount == 1


def count_finalize_failure(*, session: Session, batch_id: str, error: str, max_attempts: int) -> int | None:
    """Counts a failed finalization; at max_attempts the batch is failed with finalize_failed (its finished
    lines stay readable through /partial). Returns the count, None if the batch is not finalizing."""
    failures = session.execute(
        update(Batch).where(Batch.id == batch_id, Batch.status == BatchStatus.FINALIZING)
        .values(finalize_failures=Batch.finalize_failures + 1).returning(Batch.finalize_failures)).scalar()
    if failures is not None and failures >= max_attempts:
        session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == BatchStatus.FINALIZING).values(
            status=BatchStatus.FAILED, failed_at=int(time.time()), errors={"object": "list", "data": [{
                "code": "finalize_failed", "line": None, "param": None,
                "message": f"writing the output files failed {failures} times ({error}; the deployment's "
                           f"logs hold the details). Finished lines stay readable at "
                           f"GET /v1/batches/{batch_id}/partial."}]}))
    return failures


def finish_finalizing(*, session: Session, batch: Batch, output_file_id: str | None, error_file_id: str | None,
                      usage: dict[str, Any], succeeded: int, failed_shards: int, now: int) -> BatchStatus | None:
    """finalizing -> the final status: cancelled (cancel requested), expired (window passed), failed (shards
    failed and nothing succeeded), else completed; with its files and usage. None: another finalizer won."""
    values: dict[str, Any] = {"output_file_id": output_file_id, "error_file_id": error_file_id, "usage": usage}
    if batch.cancelling_at is not None:
        values.update(status=BatchStatus.CANCELLED, cancelled_at=now)
    elif batch.expired_at is not None:
        values.update(status=BatchStatus.EXPIRED)
    elif failed_shards and not succeeded:
        values.update(status=BatchStatus.FAILED, failed_at=now, errors={"object": "list", "data": [{
            "code": "worker_failed", "line": None, "param": None,
            "message": f"{failed_shards} shard(s) failed after retries; see the error file"}]})
    else:
        values.update(status=BatchStatus.COMPLETED, completed_at=now)
    won = session.execute(update(Batch).where(Batch.id == batch.id, Batch.status == BatchStatus.FINALIZING)
                          .values(**values)).rowcount == 1
    return values["status"] if won else None


def result_page(*, session: Session, batch_id: str, outcome: RequestOutcome, after_id: int = 0,
                limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
    """(row id, output line) of the batch's results with this outcome, in id order after after_id."""
    rows = session.execute(
        select(RequestResult.id, RequestResult.output_line)
        .where(RequestResult.batch_id == batch_id, RequestResult.outcome == outcome, RequestResult.id > after_id)
        .order_by(RequestResult.id).limit(limit)
    ).all()
    return [(row_id, line) for row_id, line in rows]


def succeeded_custom_ids(*, session: Session, batch_id: str) -> set[str]:
    """The custom_ids of the batch's requests that succeeded."""
    return set(session.scalars(
        select(RequestResult.custom_id)
        .where(RequestResult.batch_id == batch_id, RequestResult.outcome == RequestOutcome.SUCCEEDED)
    ))
