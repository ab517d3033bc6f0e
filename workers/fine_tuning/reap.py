"""The fine-tune kind's part of a reaper pass: a job whose shard failed for good (its workers kept dying,
max_attempts) is failed with the shard's last error, so no job waits forever for a shard that won't run."""

from __future__ import annotations

from db.fine_tuning import fail_orphaned
from db.session import session_scope
from genq.settings import Settings
from workers.reap_report import ReapReport


def reap_fine_tunes(settings: Settings, report: ReapReport) -> None:
    with session_scope(settings.resolved_database_url()) as session:
        report.failed_fine_tunes += fail_orphaned(session=session)
