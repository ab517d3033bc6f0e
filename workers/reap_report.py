"""What one reaper pass changed (workers/reaper.py and each job kind's pass fill it in)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReapReport:
    redispatched: list[int] = field(default_factory=list)  # shard ids sent again
    failed_shards: int = 0  # shards that ran out of attempts
    expired_batches: list[str] = field(default_factory=list)
    finalized_batches: list[str] = field(default_factory=list)
    failed_fine_tunes: list[str] = field(default_factory=list)  # their shard failed for good
    deleted_files: list[str] = field(default_factory=list)  # past expires_at
    deleted_batches: list[str] = field(default_factory=list)  # finished longer than batch_retention_seconds
