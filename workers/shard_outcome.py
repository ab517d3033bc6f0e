"""How one run of a shard ended, whatever its job kind: what the Celery task logs and acts on."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ShardRun(enum.StrEnum):
    """How one run_shard call ended."""

    NOT_CLAIMED = "not_claimed"  # a duplicate delivery: leased elsewhere, finished, or its job stopped
    DONE = "done"  # the work is done: every request has a stored result, or the training finished
    CANCELLED = "cancelled"  # the job was cancelled (or a batch expired, or the caller's cancel event was set)
    LEASE_LOST = "lease_lost"  # another attempt owns the shard now; this one wrote nothing more
    RELEASED = "released"  # this attempt crashed or ran past its time limit; attempts are left
    FAILED = "failed"  # ... and it was the last attempt


@dataclass
class ShardOutcome:
    """What one run_shard call did."""

    shard_id: int
    status: ShardRun
    attempt: int | None = None
    written: int = 0  # results (or training steps) this attempt stored
    skipped: int = 0  # requests (or training steps) an earlier attempt had already stored
    queue: str | None = None  # for RELEASED: where to send the shard again
    error: str | None = None
    finalized: bool = False  # this call finalized the job
