"""The reaper: expiry, stuck batches, and a full recovery from a worker that died mid-shard."""

from __future__ import annotations

import json
import time

from sqlalchemy import select, update

from db.batches import batch_runs
from db.leases import claim_shard
from db.models import Batch, BatchStatus, File, RequestResult, Shard, ShardStatus
from db.session import session_scope
from storage import store_from_settings
from tests.workers.conftest import chat_line
from tests.workers.fake_model import FakeModel
from workers.batches.shard_runner import run_shard
from workers.reaper import reap


def _batch(settings, batch_id) -> Batch:
    with session_scope(settings.database_url) as session:
        return session.get(Batch, batch_id)


def _lines(settings, file_id) -> list[dict]:
    with session_scope(settings.database_url) as session:
        key = session.get(File, file_id).storage_key
    return [json.loads(x) for x in store_from_settings(settings).get_bytes(key).splitlines()]


def test_expired_batch_gets_batch_expired_lines(settings, make_batch, fake_model, monkeypatch):
    monkeypatch.setattr("workers.reaper.enqueue_shards", lambda *_: None)
    made = make_batch([chat_line(f"r{i}", f"hello {i}") for i in range(6)])  # shards of 4 and 2
    assert run_shard(settings=settings, shard_id=made.shard_ids[0], worker_id="w",
                     model_loader=lambda _m: fake_model).status == "done"
    with session_scope(settings.database_url) as session:
        session.execute(update(Batch).where(Batch.id == made.batch_id).values(expires_at=int(time.time()) - 1))
    report = reap(settings)
    assert report.expired_batches == [made.batch_id] and report.finalized_batches == [made.batch_id]
    batch = _batch(settings, made.batch_id)
    assert batch.status == BatchStatus.EXPIRED and batch.expired_at is not None
    assert [line["custom_id"] for line in _lines(settings, batch.output_file_id)] == ["r0", "r1", "r2", "r3"]
    errors = _lines(settings, batch.error_file_id)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("r4", "batch_expired"), ("r5", "batch_expired")]
    assert reap(settings).finalized_batches == []  # exactly once


def test_running_shard_stops_when_its_batch_expires(settings, make_batch):
    model = FakeModel(step_delay=0.1)
    made = make_batch([chat_line(f"r{i}", f"hello {i}") for i in range(4)])
    original = model.submit

    def submit_then_expire(requests):
        with session_scope(settings.database_url) as session:
            session.execute(update(Batch).where(Batch.id == made.batch_id).values(expires_at=int(time.time()) - 1))
        reap(settings)
        return original(requests)

    model.submit = submit_then_expire
    outcome = run_shard(settings=settings, shard_id=made.shard_ids[0], worker_id="w", model_loader=lambda _m: model)
    assert outcome.status == "cancelled" and outcome.finalized
    batch = _batch(settings, made.batch_id)
    assert batch.status == BatchStatus.EXPIRED
    assert {e["error"]["code"] for e in _lines(settings, batch.error_file_id)} == {"batch_expired"}


def test_reaper_finalizes_a_batch_whose_finalizer_never_ran(settings, make_batch, fake_model, monkeypatch):
    monkeypatch.setattr("workers.batches.shard_runner.maybe_finalize", lambda *_: False)  # the worker died right after
    made = make_batch([chat_line("r0", "hello")])
    run_shard(settings=settings, shard_id=made.shard_ids[0], worker_id="w", model_loader=lambda _m: fake_model)
    assert _batch(settings, made.batch_id).status == BatchStatus.IN_PROGRESS
    assert reap(settings).finalized_batches == [made.batch_id]
    assert _batch(settings, made.batch_id).status == BatchStatus.COMPLETED


def test_dead_worker_recovery_writes_each_request_once(settings, make_batch, fake_model, monkeypatch):
    sent = []
    monkeypatch.setattr("workers.reaper.enqueue_shards", lambda _s, shards: sent.extend(shards))
    made = make_batch([chat_line(f"r{i}", f"hello {i}") for i in range(4)])
    shard_id = made.shard_ids[0]
    with session_scope(settings.database_url) as session:  # a worker claimed it and was kill -9'd
        assert claim_shard(session=session, shard_id=shard_id, worker_id="dead", lease_seconds=0.01,
                           max_attempts=3, job_runs=batch_runs()) == 1
    time.sleep(0.05)
    assert reap(settings).redispatched == [shard_id]
    # The reaper's message and the broker's own redelivery of the old one: one runs, one is a no-op.
    outcomes = [run_shard(settings=settings, shard_id=shard_id, worker_id=w, model_loader=lambda _m: fake_model)
                for w in ("w2", "w3")]
    assert [o.status for o in outcomes] == ["done", "not_claimed"]
    with session_scope(settings.database_url) as session:
        rows = session.execute(select(RequestResult.custom_id, RequestResult.attempt)
                               .where(RequestResult.batch_id == made.batch_id)).all()
        shard = session.get(Shard, shard_id)
    assert sorted(rows) == [(f"r{i}", 2) for i in range(4)]
    assert (shard.status, shard.attempt) == (ShardStatus.DONE, 2)
    assert _batch(settings, made.batch_id).status == BatchStatus.COMPLETED
