"""A shard's heartbeat thread, whatever its job kind: renews the lease, watches the job, keeps the time limit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception, stop_after_delay, stop_any, wait_exponential

from db.leases import renew_lease
from db.session import session_scope
from storage.errors import StorageError, StorageKeyNotFound

log = logging.getLogger(__name__)
T = TypeVar("T")


class Heartbeat(threading.Thread):
    """Renews the lease every interval and asks the job's kind whether its job stopped (cancel, expiry)."""

    def __init__(self, *, database_url: str, shard_id: int, attempt: int, job_stopped: Callable[[Session], bool],
                 lease_seconds: float, interval: float, time_limit: float,
                 cancel: threading.Event | None = None) -> None:
        super().__init__(name=f"heartbeat-shard-{shard_id}", daemon=True)
        self.database_url = database_url
        self.shard_id = shard_id
        self.attempt = attempt
        self.job_stopped = job_stopped
        self.lease_seconds = lease_seconds
        self.interval = interval
        self.stop_requested = threading.Event()  # cancel or expiry: finish the shard as cancelled
        self.lease_lost = threading.Event()  # another attempt owns the shard: write nothing more
        self.cancel = cancel  # set by the caller (genq run's Ctrl-C): stop now, as for a cancel
        # Celery's time limits need the prefork pool; genq's shards run in threads, so the heartbeat
        # keeps the limit: past it the attempt aborts its requests and counts as a crashed one.
        self.deadline = time.monotonic() + time_limit
        self.timed_out = threading.Event()
        self._done = threading.Event()
        self._renewed_at = time.monotonic()

    def should_stop(self) -> bool:
        if self.cancel is not None and self.cancel.is_set():
            self.stop_requested.set()
        if time.monotonic() > self.deadline:
            self.timed_out.set()
        return self.stop_requested.is_set() or self.lease_lost.is_set() or self.timed_out.is_set()

    def beat(self) -> None:
        try:
            with session_scope(self.database_url) as session:
                held = renew_lease(session=session, shard_id=self.shard_id, attempt=self.attempt,
                                   lease_seconds=self.lease_seconds)
                stop = self.job_stopped(session)
        except Exception as exc:  # a database blip: keep going while the lease may still be ours
            log.warning("heartbeat of shard %s failed: %s", self.shard_id, exc)
            if time.monotonic() - self._renewed_at > self.lease_seconds:
                self.lease_lost.set()
            return
        self._renewed_at = time.monotonic()
        if not held:
            log.warning("shard %s attempt %s lost its lease", self.shard_id, self.attempt)
            self.lease_lost.set()
        if stop:
            self.stop_requested.set()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.beat()

    def close(self) -> None:
        self._done.set()
        self.join(timeout=self.interval + 5)


def _storage_unreachable(exc: BaseException) -> bool:
    return isinstance(exc, StorageError) and not isinstance(exc, StorageKeyNotFound)


def while_storage_is_down(read: Callable[[], T], heartbeat: Heartbeat, limit: float) -> T:
    """read(), tried again while storage is unreachable (not for a missing key), for up to limit seconds
    or until the shard must stop (its heartbeat says so). The heartbeat keeps the lease meanwhile, so an
    outage of the store costs time, not one of the shard's attempts."""
    retrying = Retrying(retry=retry_if_exception(_storage_unreachable), wait=wait_exponential(multiplier=0.5, max=5),
                        stop=stop_any(stop_after_delay(limit), lambda _state: heartbeat.should_stop()),
                        before_sleep=lambda state: log.warning("storage unreachable, waiting: %s",
                                                               state.outcome.exception()), reraise=True)
    return retrying(read)
