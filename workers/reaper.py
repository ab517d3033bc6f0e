"""The reaper: one pass that repairs whatever crashed workers and lost messages left behind.

Each pass (every settings.reaper_interval_seconds, from beat's "genq.reap", `genq reaper`, or the
reaper process `genq worker` starts) does, with conditional UPDATEs only, so any number of reapers
may run at once:
  1. running shards whose lease expired -> queued and re-sent (or failed past max_attempts);
  2. queued shards untouched for queued_redispatch_seconds -> re-sent, as many per queue as the
     broker is missing messages for (lost in a Redis flush or never published);
  3. each job kind's pass (KIND_PASSES). Batches (workers/batches/reap.py): past expires_at -> marked
     expired (running shards stop at their next heartbeat); in_progress/cancelling with no queued or
     running shard -> finalized; stuck in finalizing for finalizing_stale_seconds -> finalized again.
     Fine-tunes (workers/fine_tuning/reap.py): a running or queued job whose shard failed -> failed;
  4. expired files and finished batches past their retention -> deleted, rows and objects
     (workers/retention.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from db.leases import Redispatch, queued_shard_counts, requeue_expired_leases, stale_queued_shards
from db.session import session_scope
from genq.settings import Settings
from workers.batches.reap import reap_batches
from workers.dispatch import enqueue_shards, queue_depths
from workers.fine_tuning.reap import reap_fine_tunes
from workers.reap_report import ReapReport
from workers.retention import collect

log = logging.getLogger(__name__)

# Each job kind's own pass (step 3): its expiries, cancellations and finalizations.
KIND_PASSES: list[Callable[[Settings, ReapReport], None]] = [reap_batches, reap_fine_tunes]


def reap(settings: Settings) -> ReapReport:
    """One reaper pass (see the module docstring); returns what it did."""
    url = settings.resolved_database_url()
    report = ReapReport()
    with session_scope(url) as session:
        expired, failed_jobs = requeue_expired_leases(session=session, max_attempts=settings.max_attempts)
    report.failed_shards = len(failed_jobs)
    # Sent first: _lost_messages compares the queued shards with the broker's queue depth, which must
    # already hold these shards' new messages, or as many intact ones would be sent a second time.
    _redispatch(settings, expired, report)
    _redispatch(settings, _lost_messages(settings), report)

    for reap_kind in KIND_PASSES:
        reap_kind(settings, report)
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
