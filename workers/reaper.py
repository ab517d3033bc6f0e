"""The reaper: one pass that repairs whatever crashed workers and lost messages left behind.

Each pass (every settings.reaper_interval_seconds, from beat's "genq.reap", `genq reaper`, or the
reaper process `genq worker` starts) does, with conditional UPDATEs only, so any number of reapers
may run at once:
  1. running shards whose lease expired -> queued and re-sent (or failed past max_attempts);
  2. queued shards untouched for queued_redispatch_seconds -> re-sent, as many per queue as the
     broker is missing messages for (lost in a Redis flush or never published);
  3. batches past expires_at -> marked expired (running shards stop at their next heartbeat);
  4. batches in_progress/cancelling with no queued or running shard -> finalized;
  5. batches stuck in finalizing for finalizing_stale_seconds -> finalized again;
  6. expired files and finished batches past their retention -> deleted, rows and objects
     (workers/retention.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sqlalchemy import select, update

from db.leases import (
    Redispatch,
    batch_has_active_shards,
    cancel_queued_shards,
    queued_shard_counts,
    requeue_expired_leases,
    stale_queued_shards,
)
from db.models import Batch, BatchStatus
from db.session import session_scope
from genq.settings import Settings
from workers.dispatch import enqueue_shards, queue_depths
from workers.finalize import maybe_finalize, refinalize_stale
from workers.retention import collect

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    """What one reaper pass changed."""

    redispatched: list[int] = field(default_factory=list)  # shard ids sent again
    failed_shards: int = 0  # shards that ran out of attempts
    expired_batches: list[str] = field(default_factory=list)
    finalized_batches: list[str] = field(default_factory=list)
    deleted_files: list[str] = field(default_factory=list)  # past expires_at
    deleted_batches: list[str] = field(default_factory=list)  # finished longer than batch_retention_seconds


def reap(settings: Settings) -> ReapReport:
    """One reaper pass (see the module docstring); returns what it did."""
    url = settings.resolved_database_url()
    report = ReapReport()
    with session_scope(url) as session:
        expired, failed_batches = requeue_expired_leases(session=session, max_attempts=settings.max_attempts)
    report.failed_shards = len(failed_batches)
    # Sent first: _lost_messages compares the queued shards with the broker's queue depth, which must
    # already hold these shards' new messages, or as many intact ones would be sent a second time.
    _redispatch(settings, expired, report)
    _redispatch(settings, _lost_messages(settings), report)

    now = int(time.time())
    with session_scope(url) as session:
        expiring = session.scalars(select(Batch.id).where(
            Batch.status == BatchStatus.IN_PROGRESS, Batch.expires_at.is_not(None), Batch.expires_at < now,
            Batch.expired_at.is_(None))).all()
        for batch_id in expiring:
            marked = session.execute(update(Batch).where(Batch.id == batch_id, Batch.expired_at.is_(None),
                                                         Batch.status == BatchStatus.IN_PROGRESS)
                                     .values(expired_at=now)).rowcount
            if marked:
                cancel_queued_shards(session=session, batch_id=batch_id)
                report.expired_batches.append(batch_id)

    with session_scope(url) as session:
        active = batch_has_active_shards()
        idle = session.scalars(select(Batch.id).where(
            Batch.status.in_([BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING]),
            (~active) | (Batch.status == BatchStatus.CANCELLING) | Batch.expired_at.is_not(None))).all()
        stale = session.scalars(select(Batch.id).where(
            Batch.status == BatchStatus.FINALIZING,
            Batch.finalizing_at < now - settings.finalizing_stale_seconds)).all()
    for batch_id in idle:
        if maybe_finalize(settings, batch_id):
            report.finalized_batches.append(batch_id)
    for batch_id in stale:
        if refinalize_stale(settings, batch_id, settings.finalizing_stale_seconds):
            report.finalized_batches.append(batch_id)
    collected = collect(settings)
    report.deleted_files, report.deleted_batches = collected.files, collected.batches
    return report


def _redispatch(settings: Settings, shards: list[Redispatch], report: ReapReport) -> None:
    if shards:
        enqueue_shards(settings, [(r.shard_id, r.queue) for r in shards])
        report.redispatched += [r.shard_id for r in shards]
        log.info("reaper re-sent shards %s", [r.shard_id for r in shards])


def _lost_messages(settings: Settings) -> list[Redispatch]:
    """Stale queued shards to send again: per queue, as many as the broker holds fewer messages than
    there are queued shards (so a long but intact queue is not flooded with duplicates)."""
    if not settings.broker_url:
        return []
    url = settings.resolved_database_url()
    older = settings.queued_redispatch_seconds
    with session_scope(url) as session:
        counts = queued_shard_counts(session=session, older_than_seconds=older)
    if not counts:
        return []
    depths = queue_depths(settings, counts)
    if depths is None:
        return []  # the broker is down: a re-send would fail too; next pass
    allowance = {queue: total - depths.get(queue, 0) for queue, (total, _stale) in counts.items()}
    with session_scope(url) as session:
        return stale_queued_shards(session=session, older_than_seconds=older, allowance=allowance)
