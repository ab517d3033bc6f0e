"""Shard leases fenced by `attempt`: claim, renew, fenced writes, finish, and what the reaper needs.

Every worker write carries the attempt it claimed; a claim bumps the attempt, so a zombie whose lease
expired (or whose shard was requeued) changes nothing. Nothing here knows what a shard computes:
chat batches and fine-tunes (each kind passes claim_shard its own "the job still runs" condition).
Each function runs in the caller's session; the caller commits (session_scope), so one claim or one
fenced write is one short transaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, case, exists, func, or_, select, update
from sqlalchemy.orm import Session

from db.models import RequestOutcome, RequestResult, Shard, ShardStatus
from db.session import insert_ignoring_conflicts

ACTIVE_SHARD_STATUSES = (ShardStatus.QUEUED, ShardStatus.RUNNING)


def has_active_shards(job_id: ColumnElement[str]) -> ColumnElement[bool]:
    """A condition on the enclosing query's job id column (Batch.id, FineTuningJob.id): the job still
    has a queued or running shard."""
    return exists().where(Shard.job_id == job_id, Shard.status.in_(ACTIVE_SHARD_STATUSES))


def _now() -> float:
    return time.time()


def claim_shard(*, session: Session, shard_id: int, worker_id: str, lease_seconds: float,
                max_attempts: int, job_runs: ColumnElement[bool]) -> int | None:
    """Leases the shard to worker_id and returns the new attempt (the fencing token), or None.

    job_runs is the shard's kind's condition on Shard (db/batches.batch_runs, db/fine_tuning.job_runs):
    whether its job still wants work done. None means there is nothing to do: another worker holds a
    live lease, the shard is finished, its job no longer runs (then a queued shard is marked cancelled),
    or its attempts are exhausted (then it is marked failed). The caller finalizes the job in the last two.
    """
    now = _now()
    claimable = or_(Shard.status == ShardStatus.QUEUED,
                    and_(Shard.status == ShardStatus.RUNNING, Shard.lease_expires_at < now))
    # Claiming a running shard whose lease expired (before the reaper saw it) is a death too.
    died = case((Shard.status == ShardStatus.RUNNING, Shard.deaths + 1), else_=Shard.deaths)
    row = session.execute(
        update(Shard)
        .where(Shard.id == shard_id, claimable, Shard.attempt < max_attempts, job_runs)
        .values(status=ShardStatus.RUNNING, attempt=Shard.attempt + 1, lease_owner=worker_id,
                lease_expires_at=now + lease_seconds, updated_at=now, deaths=died)
        .returning(Shard.attempt)
    ).first()
    if row is not None:
        return int(row[0])
    # Not claimable: settle the shards that can never be claimed again, so the job can finish.
    session.execute(
        update(Shard)
        .where(Shard.id == shard_id, claimable, Shard.attempt >= max_attempts)
        .values(status=ShardStatus.FAILED, lease_owner=None, lease_expires_at=None, updated_at=now,
                last_error=f"gave up after {max_attempts} attempts")
    )
    session.execute(
        update(Shard)
        .where(Shard.id == shard_id, claimable, ~job_runs)
        .values(status=ShardStatus.CANCELLED, lease_owner=None, lease_expires_at=None, updated_at=now)
    )
    return None


def _fenced(shard_id: int, attempt: int) -> Any:
    return and_(Shard.id == shard_id, Shard.attempt == attempt, Shard.status == ShardStatus.RUNNING)


def renew_lease(*, session: Session, shard_id: int, attempt: int, lease_seconds: float) -> bool:
    """Extends the lease of this attempt; False when it was lost (re-claimed, requeued or finished)."""
    now = _now()
    result = session.execute(
        update(Shard).where(_fenced(shard_id, attempt)).values(lease_expires_at=now + lease_seconds,
                                                                updated_at=now)
    )
    return result.rowcount == 1


def fence(*, session: Session, shard_id: int, attempt: int) -> bool:
    """Row-locks the shard (the whole database on SQLite) until commit if this attempt still holds it; the
    writes that follow in the same transaction are then fenced: no claim can slip in before they land."""
    return session.execute(update(Shard).where(_fenced(shard_id, attempt)).values(updated_at=_now())).rowcount == 1


def mark_suspect(*, session: Session, shard_id: int, attempt: int, custom_id: str) -> bool:
    """Names the request this attempt is about to run alone; False when the lease was lost."""
    return session.execute(update(Shard).where(_fenced(shard_id, attempt)).values(suspect=custom_id)).rowcount == 1


@dataclass
class ResultRow:
    """One request's outcome as a worker computed it; becomes a RequestResult row."""

    custom_id: str
    line_number: int  # 1-based line in the batch's input file
    outcome: RequestOutcome
    output_line: dict[str, Any]  # the OpenAI output line or error line, exactly as it will be written
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _insert_results(session: Session, *, batch_id: str, shard_id: int, attempt: int, worker_id: str | None,
                    results: list[ResultRow], now: float) -> None:
    """Inserts RequestResult rows and adds them to the shard's counters, in the caller's transaction.

    A result already stored for (batch, custom_id) is kept (ON CONFLICT DO NOTHING) and counted once:
    the counters add only the rows the INSERT returns."""
    if not results:
        return
    inserted = session.execute(insert_ignoring_conflicts(session, RequestResult, [{
        "batch_id": batch_id, "shard_id": shard_id, "custom_id": r.custom_id, "line_number": r.line_number,
        "outcome": r.outcome, "output_line": r.output_line, "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens, "attempt": attempt, "worker_id": worker_id, "created_at": now,
    } for r in results], index_elements=["batch_id", "custom_id"]).returning(
        RequestResult.outcome, RequestResult.prompt_tokens, RequestResult.completion_tokens)).all()
    if inserted:
        session.execute(update(Shard).where(Shard.id == shard_id).values(
            succeeded=Shard.succeeded + sum(1 for row in inserted if row.outcome == RequestOutcome.SUCCEEDED),
            failed=Shard.failed + sum(1 for row in inserted if row.outcome == RequestOutcome.FAILED),
            prompt_tokens=Shard.prompt_tokens + sum(row.prompt_tokens for row in inserted),
            completion_tokens=Shard.completion_tokens + sum(row.completion_tokens for row in inserted)))


def record_results(*, session: Session, batch_id: str, shard_id: int, attempt: int, worker_id: str,
                   results: list[ResultRow]) -> bool:
    """Stores results if this attempt still holds the shard; False (nothing written) otherwise.

    One transaction however many: the fence is an UPDATE of the shard row, which row-locks it (the
    whole database on SQLite) until commit, so no claim can slip between the check and the insert. A
    result already stored for (batch, custom_id) is kept: ON CONFLICT DO NOTHING.
    """
    if not fence(session=session, shard_id=shard_id, attempt=attempt):
        return False
    _insert_results(session, batch_id=batch_id, shard_id=shard_id, attempt=attempt, worker_id=worker_id,
                    results=results, now=_now())
    return True


def record_unfenced_results(*, session: Session, batch_id: str, shard_id: int, attempt: int,
                            worker_id: str | None, results: list[ResultRow]) -> None:
    """Stores results no worker holds a lease for (the finalizer's cancelled/expired/failed lines)."""
    _insert_results(session, batch_id=batch_id, shard_id=shard_id, attempt=attempt, worker_id=worker_id,
                    results=results, now=_now())


def done_custom_ids(*, session: Session, shard_id: int) -> set[str]:
    """custom_ids of this shard that already have a result (a resumed attempt skips them)."""
    return set(session.scalars(select(RequestResult.custom_id).where(RequestResult.shard_id == shard_id)))


def finish_shard(*, session: Session, shard_id: int, attempt: int, status: ShardStatus,
                 error: str | None = None) -> bool:
    """Moves this attempt's shard to done/failed/cancelled; False when the lease was lost meanwhile."""
    if status not in (ShardStatus.DONE, ShardStatus.FAILED, ShardStatus.CANCELLED):
        raise ValueError(f"finish_shard to {status!r}: not a final status")
    result = session.execute(
        update(Shard).where(_fenced(shard_id, attempt))
        .values(status=status, lease_owner=None, lease_expires_at=None, updated_at=_now(), last_error=error)
    )
    return result.rowcount == 1


def release_shard(*, session: Session, shard_id: int, attempt: int, error: str,
                  max_attempts: int) -> ShardStatus | None:
    """After a crashed attempt: back to queued (attempts left) or failed; None if the lease was lost."""
    status = ShardStatus.QUEUED if attempt < max_attempts else ShardStatus.FAILED
    result = session.execute(
        update(Shard).where(_fenced(shard_id, attempt))
        .values(status=status, lease_owner=None, lease_expires_at=None, updated_at=_now(), last_error=error)
    )
    return status if result.rowcount == 1 else None


# --- the reaper's side ------------------------------------------------------------------------------


@dataclass
class Redispatch:
    """A shard the reaper put back in its queue."""

    shard_id: int
    queue: str
    job_id: str


def requeue_expired_leases(*, session: Session, max_attempts: int, limit: int = 500) -> tuple[list[Redispatch],
                                                                                               list[str]]:
    """Expired running shards go back to queued, or to failed past max_attempts.

    Returns (shards to send again, job ids whose shards failed). Each transition is a conditional
    UPDATE, so concurrent reapers never both act on one shard.
    """
    now = _now()
    expired = session.execute(
        select(Shard.id, Shard.queue, Shard.job_id, Shard.attempt)
        .where(Shard.status == ShardStatus.RUNNING, Shard.lease_expires_at < now).limit(limit)
    ).all()
    redispatch: list[Redispatch] = []
    failed_jobs: list[str] = []
    for shard_id, queue, job_id, attempt in expired:
        settled = Shard.id == shard_id, Shard.attempt == attempt, Shard.status == ShardStatus.RUNNING, \
            Shard.lease_expires_at < now
        if attempt >= max_attempts:
            result = session.execute(update(Shard).where(*settled).values(
                status=ShardStatus.FAILED, lease_owner=None, lease_expires_at=None, updated_at=now,
                deaths=Shard.deaths + 1, last_error=f"lease expired on attempt {attempt} of {max_attempts}: "
                                                    "worker lost"))
            if result.rowcount == 1:
                failed_jobs.append(job_id)
        else:
            result = session.execute(update(Shard).where(*settled).values(
                status=ShardStatus.QUEUED, lease_owner=None, lease_expires_at=None, updated_at=now,
                deaths=Shard.deaths + 1, last_error=f"lease expired on attempt {attempt}: worker lost"))
            if result.rowcount == 1:
                redispatch.append(Redispatch(shard_id, queue, job_id))
    return redispatch, failed_jobs


def queued_shard_counts(*, session: Session, older_than_seconds: float) -> dict[str, tuple[int, int]]:
    """{queue: (queued shards, of which untouched for older_than_seconds)} for queues with stale shards."""
    cutoff = _now() - older_than_seconds
    rows = session.execute(
        select(Shard.queue, func.count(), func.count().filter(Shard.updated_at < cutoff))
        .where(Shard.status == ShardStatus.QUEUED).group_by(Shard.queue)
    ).all()
    return {queue: (int(total), int(stale)) for queue, total, stale in rows if stale}


def stale_queued_shards(*, session: Session, older_than_seconds: float, allowance: dict[str, int] | None = None,
                        limit: int = 500) -> list[Redispatch]:
    """Queued shards untouched for older_than_seconds whose message may be lost, oldest first; each is
    touched, so one reaper re-sends it once per period. allowance caps how many per queue (how many
    messages the broker is missing)."""
    now = _now()
    rows = session.execute(
        select(Shard.id, Shard.queue, Shard.job_id, Shard.updated_at)
        .where(Shard.status == ShardStatus.QUEUED, Shard.updated_at < now - older_than_seconds)
        .order_by(Shard.updated_at).limit(limit)
    ).all()
    left = dict(allowance) if allowance is not None else None
    out = []
    for shard_id, queue, job_id, updated_at in rows:
        if left is not None:
            if left.get(queue, 0) <= 0:
                continue
            left[queue] -= 1
        result = session.execute(update(Shard).where(
            Shard.id == shard_id, Shard.status == ShardStatus.QUEUED, Shard.updated_at == updated_at,
        ).values(updated_at=now))
        if result.rowcount == 1:
            out.append(Redispatch(shard_id, queue, job_id))
    return out


def cancel_queued_shards(*, session: Session, job_id: str) -> int:
    """Queued shards of a job that stopped running become cancelled; returns how many."""
    result = session.execute(
        update(Shard).where(Shard.job_id == job_id, Shard.status == ShardStatus.QUEUED)
        .values(status=ShardStatus.CANCELLED, updated_at=_now())
    )
    return result.rowcount


def abandon_running_shards(*, session: Session, job_id: str) -> int:
    """Running shards of a job whose only worker is gone (an interrupted `genq run`) become cancelled."""
    result = session.execute(
        update(Shard).where(Shard.job_id == job_id, Shard.status == ShardStatus.RUNNING)
        .values(status=ShardStatus.CANCELLED, lease_owner=None, lease_expires_at=None, updated_at=_now())
    )
    return result.rowcount
