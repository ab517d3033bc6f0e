"""The batch kind's part of a reaper pass: expiry, finalizing idle batches, re-finalizing stuck ones."""

from __future__ import annotations

import time

from sqlalchemy import select

from db.batches import mark_expired
from db.leases import cancel_queued_shards, has_active_shards
from db.models import Batch, BatchStatus
from db.session import session_scope
from genq.settings import Settings
from workers.batches.finalize import maybe_finalize, refinalize_stale
from workers.reap_report import ReapReport


def reap_batches(settings: Settings, report: ReapReport) -> None:
    """Batches past expires_at -> expired_at set (queued shards cancelled, running ones stop at their next
    heartbeat); in_progress/cancelling batches with no active shard (or cancelling, or expired) ->
    finalized; batches finalizing for finalizing_stale_seconds -> finalized again."""
    url = settings.resolved_database_url()
    now = int(time.time())
    with session_scope(url) as session:
        expiring = session.scalars(select(Batch.id).where(
            Batch.status == BatchStatus.IN_PROGRESS, Batch.expires_at.is_not(None), Batch.expires_at < now,
            Batch.expired_at.is_(None))).all()
        for batch_id in expiring:
            if mark_expired(session=session, batch_id=batch_id, now=now):
                cancel_queued_shards(session=session, job_id=batch_id)
                report.expired_batches.append(batch_id)

    with session_scope(url) as session:
        idle = session.scalars(select(Batch.id).where(
            Batch.status.in_([BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING]),
            (~has_active_shards(Batch.id)) | (Batch.status == BatchStatus.CANCELLING)
            | Batch.expired_at.is_not(None))).all()
        stale = session.scalars(select(Batch.id).where(
            Batch.status == BatchStatus.FINALIZING,
            Batch.finalizing_at < now - settings.finalizing_stale_seconds)).all()
    for batch_id in idle:
        if maybe_finalize(settings, batch_id):
            report.finalized_batches.append(batch_id)
    for batch_id in stale:
        if refinalize_stale(settings, batch_id, settings.finalizing_stale_seconds):
            report.finalized_batches.append(batch_id)
