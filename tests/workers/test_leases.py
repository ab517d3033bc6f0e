"""Leases: one claim wins, zombies are fenced out, attempts are capped, expired leases are re-dispatched."""

from __future__ import annotations

import time

from sqlalchemy import func, select, update

from db.batches import batch_runs
from db.leases import (
    ResultRow,
    claim_shard,
    finish_shard,
    record_results,
    renew_lease,
    requeue_expired_leases,
)
from db.models import RequestOutcome, RequestResult, Shard, ShardStatus
from db.session import session_scope
from tests.workers.conftest import chat_line
from workers.reaper import reap


def _claim(settings, shard_id, worker="w1"):
    with session_scope(settings.database_url) as session:
        return claim_shard(session=session, shard_id=shard_id, worker_id=worker, lease_seconds=settings.lease_seconds,
                           max_attempts=settings.max_attempts, job_runs=batch_runs())


def _shard(settings, shard_id) -> Shard:
    with session_scope(settings.database_url) as session:
        return session.get(Shard, shard_id)


def _expire_lease(settings, shard_id):
    with session_scope(settings.database_url) as session:
        session.execute(update(Shard).where(Shard.id == shard_id).values(lease_expires_at=time.time() - 1))


def _row(custom_id="r0"):
    return ResultRow(custom_id=custom_id, line_number=1, outcome=RequestOutcome.SUCCEEDED,
                     output_line={"custom_id": custom_id}, prompt_tokens=3, completion_tokens=4)


def _result_count(settings, batch_id) -> int:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(RequestResult).where(RequestResult.batch_id == batch_id))


def test_second_claim_gets_none(settings, make_batch):
    made = make_batch([chat_line("r0", "hi")])
    shard_id = made.shard_ids[0]
    assert _claim(settings, shard_id, "w1") == 1
    assert _claim(settings, shard_id, "w2") is None
    shard = _shard(settings, shard_id)
    assert (shard.status, shard.attempt, shard.lease_owner) == (ShardStatus.RUNNING, 1, "w1")


def test_zombie_is_fenced_out(settings, make_batch):
    made = make_batch([chat_line("r0", "hi"), chat_line("r1", "there")])
    shard_id = made.shard_ids[0]
    assert _claim(settings, shard_id, "zombie") == 1
    _expire_lease(settings, shard_id)
    assert _claim(settings, shard_id, "w2") == 2
    with session_scope(settings.database_url) as session:
        assert not record_results(session=session, batch_id=made.batch_id, shard_id=shard_id, attempt=1,
                                 worker_id="zombie", results=[_row("r0")])
        assert not renew_lease(session=session, shard_id=shard_id, attempt=1, lease_seconds=5)
        assert not finish_shard(session=session, shard_id=shard_id, attempt=1, status=ShardStatus.DONE)
    assert _result_count(settings, made.batch_id) == 0
    with session_scope(settings.database_url) as session:
        assert record_results(session=session, batch_id=made.batch_id, shard_id=shard_id, attempt=2,
                             worker_id="w2", results=[_row("r0")])
        # A second write of the same custom_id (a duplicate run) keeps the first.
        assert record_results(session=session, batch_id=made.batch_id, shard_id=shard_id, attempt=2,
                             worker_id="w2", results=[_row("r0")])
        assert renew_lease(session=session, shard_id=shard_id, attempt=2, lease_seconds=5)
    assert _result_count(settings, made.batch_id) == 1
    shard = _shard(settings, shard_id)
    assert (shard.status, shard.attempt, shard.lease_owner) == (ShardStatus.RUNNING, 2, "w2")


def test_attempt_cap_marks_failed(settings, make_batch):
    made = make_batch([chat_line("r0", "hi")])
    shard_id = made.shard_ids[0]
    for attempt in range(1, settings.max_attempts + 1):
        assert _claim(settings, shard_id) == attempt
        _expire_lease(settings, shard_id)
    assert _claim(settings, shard_id) is None
    shard = _shard(settings, shard_id)
    assert shard.status == ShardStatus.FAILED
    assert "3 attempts" in shard.last_error


def test_claim_refused_once_batch_is_cancelling(settings, make_batch):
    from db.batches import request_cancel

    made = make_batch([chat_line("r0", "hi")])
    with session_scope(settings.database_url) as session:
        from db.models import Batch

        tenant_id = session.get(Batch, made.batch_id).tenant_id
        request_cancel(session=session, tenant_id=tenant_id, batch_id=made.batch_id)
    assert _claim(settings, made.shard_ids[0]) is None
    assert _shard(settings, made.shard_ids[0]).status == ShardStatus.CANCELLED


def test_reaper_requeues_expired_lease(settings, make_batch, monkeypatch):
    sent = []
    monkeypatch.setattr("workers.reaper.enqueue_shards", lambda _settings, shards: sent.extend(shards))
    made = make_batch([chat_line("r0", "hi")])
    shard_id = made.shard_ids[0]
    assert _claim(settings, shard_id) == 1
    report = reap(settings)
    assert report.redispatched == [] and sent == []  # the lease is live
    _expire_lease(settings, shard_id)
    report = reap(settings)
    assert report.redispatched == [shard_id]
    assert sent == [(shard_id, f"genq.{_shard(settings, shard_id).model}")]
    shard = _shard(settings, shard_id)
    assert (shard.status, shard.attempt, shard.lease_owner) == (ShardStatus.QUEUED, 1, None)
    # The old worker is fenced out even before anyone re-claims.
    with session_scope(settings.database_url) as session:
        assert not record_results(session=session, batch_id=made.batch_id, shard_id=shard_id, attempt=1,
                                 worker_id="w1", results=[_row()])
    assert _claim(settings, shard_id) == 2


def test_reaper_fails_expired_lease_past_max_attempts(settings, make_batch, monkeypatch):
    monkeypatch.setattr("workers.reaper.enqueue_shards", lambda *_: None)
    made = make_batch([chat_line("r0", "hi")])
    shard_id = made.shard_ids[0]
    with session_scope(settings.database_url) as session:
        session.execute(update(Shard).where(Shard.id == shard_id).values(attempt=settings.max_attempts - 1))
    assert _claim(settings, shard_id) == settings.max_attempts
    _expire_lease(settings, shard_id)
    with session_scope(settings.database_url) as session:
        redispatch, failed = requeue_expired_leases(session=session, max_attempts=settings.max_attempts)
    assert redispatch == [] and failed == [made.batch_id]
    assert _shard(settings, shard_id).status == ShardStatus.FAILED


def test_reaper_resends_queued_shards_whose_message_is_lost(settings, make_batch, redis_url):
    import redis

    from workers.dispatch import enqueue_shards

    settings = settings.model_copy(update={"broker_url": redis_url})
    made = make_batch([chat_line("r0", "hi")])
    shard_id = made.shard_ids[0]
    queue = _shard(settings, shard_id).queue
    broker = redis.Redis.from_url(redis_url)
    broker.delete(queue)

    def make_stale():
        with session_scope(settings.database_url) as session:
            session.execute(update(Shard).where(Shard.id == shard_id).values(updated_at=time.time() - 10_000))

    try:
        assert reap(settings).redispatched == []  # queued, but not long enough to suspect a lost message
        enqueue_shards(settings, [(shard_id, queue)])
        make_stale()
        assert reap(settings).redispatched == []  # its message is still in the queue: no duplicate
        broker.delete(queue)  # Redis lost it (flush, failover without AOF)
        assert reap(settings).redispatched == [shard_id]
        assert broker.llen(queue) == 1
        assert reap(settings).redispatched == []  # touched: not re-sent again until another period passes
    finally:
        broker.delete(queue)


def test_reaper_does_not_duplicate_a_message_for_a_shard_it_just_requeued(settings, make_batch, redis_url):
    import redis

    from workers.dispatch import enqueue_shards

    settings = settings.model_copy(update={"broker_url": redis_url})
    made = make_batch([chat_line(f"r{i}", "hi") for i in range(5)])  # two shards on one queue
    waiting, expired = made.shard_ids
    queue = _shard(settings, waiting).queue
    broker = redis.Redis.from_url(redis_url)
    broker.delete(queue)
    try:
        enqueue_shards(settings, [(waiting, queue)])  # its message is intact, but it has waited long
        with session_scope(settings.database_url) as session:
            session.execute(update(Shard).where(Shard.id == waiting).values(updated_at=time.time() - 10_000))
        assert _claim(settings, expired) == 1
        _expire_lease(settings, expired)
        # The expired shard's new message must count before the queue depth is compared with the queued
        # shards; otherwise the waiting shard looks lost too and gets a second message.
        assert reap(settings).redispatched == [expired]
        assert broker.llen(queue) == 2
    finally:
        broker.delete(queue)
