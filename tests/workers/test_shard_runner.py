"""run_shard with a fake model: results, resume, cancel, poison requests, lost leases, finalization."""

from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import func, select, update

from db.batches import batch_runs, request_cancel
from db.leases import ResultRow, claim_shard, record_results
from db.models import Batch, BatchStatus, File, RequestOutcome, RequestResult, Shard, ShardStatus
from db.session import session_scope
from storage import store_from_settings
from tests.workers.conftest import chat_line
from tests.workers.fake_model import POISON, FakeModel
from workers.batches.shard_runner import run_shard


def _run(settings, shard_id, model, worker="w1", **kw):
    return run_shard(settings=settings, shard_id=shard_id, worker_id=worker, model_loader=lambda _m: model, **kw)


def _batch(settings, batch_id) -> Batch:
    with session_scope(settings.database_url) as session:
        return session.get(Batch, batch_id)


def _results(settings, batch_id) -> list[RequestResult]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(RequestResult).where(RequestResult.batch_id == batch_id)
                                    .order_by(RequestResult.line_number)))


def _file_lines(settings, file_id) -> list[dict]:
    with session_scope(settings.database_url) as session:
        file = session.get(File, file_id)
    data = store_from_settings(settings).get_bytes(file.storage_key)
    assert file.bytes == len(data)
    return [json.loads(line) for line in data.splitlines()]


def test_batch_runs_to_completed_with_openai_lines(settings, make_batch, fake_model):
    made = make_batch([chat_line(f"r{i}", f"hello {i}") for i in range(6)])
    assert len(made.shard_ids) == 2  # shard_size 4
    outcomes = [_run(settings, shard_id, fake_model) for shard_id in made.shard_ids]
    assert [o.status for o in outcomes] == ["done", "done"]
    assert [o.finalized for o in outcomes] == [False, True]
    batch = _batch(settings, made.batch_id)
    assert batch.status == BatchStatus.COMPLETED and batch.error_file_id is None
    lines = _file_lines(settings, batch.output_file_id)
    assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(6)]
    first = lines[0]
    assert first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200
    body = first["response"]["body"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert len(body["choices"][0]["message"]["content"]) == 4 and body["choices"][0]["finish_reason"] == "length"
    usage = [line["response"]["body"]["usage"] for line in lines]
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usage)
    assert batch.usage["input_tokens"] == sum(u["prompt_tokens"] for u in usage)
    assert batch.usage["output_tokens"] == sum(u["completion_tokens"] for u in usage) == 24
    # A duplicate delivery after the end changes nothing.
    assert _run(settings, made.shard_ids[0], fake_model).status == "not_claimed"
    assert len(_results(settings, made.batch_id)) == 6


def test_resume_skips_stored_results(settings, make_batch, fake_model):
    made = make_batch([chat_line(f"r{i}", f"hello {i}") for i in range(4)])
    shard_id = made.shard_ids[0]
    # Attempt 1 stored two results and died.
    with session_scope(settings.database_url) as session:
        attempt = claim_shard(session=session, shard_id=shard_id, worker_id="dead", lease_seconds=5, max_attempts=3,
                              job_runs=batch_runs())
    for custom_id in ("r0", "r2"):
        with session_scope(settings.database_url) as session:
            record_results(session=session, batch_id=made.batch_id, shard_id=shard_id, attempt=attempt,
                          worker_id="dead", results=[ResultRow(custom_id=custom_id, line_number=1,
                                                               outcome=RequestOutcome.SUCCEEDED,
                                                               output_line={"custom_id": custom_id, "old": True})])
    with session_scope(settings.database_url) as session:
        session.execute(update(Shard).where(Shard.id == shard_id).values(lease_expires_at=time.time() - 1))
    outcome = _run(settings, shard_id, fake_model, worker="w2")
    assert (outcome.status, outcome.attempt, outcome.skipped, outcome.written) == ("done", 2, 2, 2)
    assert fake_model.generated == ["r1", "r3"]
    rows = {r.custom_id: r for r in _results(settings, made.batch_id)}
    assert rows["r0"].output_line["old"] and rows["r0"].worker_id == "dead"
    assert rows["r1"].attempt == 2 and rows["r1"].worker_id == "w2"


def test_poison_request_fails_alone(settings, make_batch, fake_model):
    lines = [chat_line("ok0", "fine"), chat_line("bad", f"this is {POISON}"), chat_line("ok1", "fine too"),
             chat_line("long", "x", max_tokens=250)]
    made = make_batch(lines)
    outcome = _run(settings, made.shard_ids[0], fake_model)
    assert outcome.status == "done" and outcome.finalized
    batch = _batch(settings, made.batch_id)
    assert batch.status == BatchStatus.COMPLETED
    assert [line["custom_id"] for line in _file_lines(settings, batch.output_file_id)] == ["ok0", "ok1"]
    errors = {line["custom_id"]: line for line in _file_lines(settings, batch.error_file_id)}
    assert errors["bad"]["response"]["status_code"] == 500
    assert errors["bad"]["response"]["body"]["error"]["code"] == "generation_failed"
    assert errors["long"]["response"]["status_code"] == 400
    assert errors["long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert errors["long"]["genq"] == {"attempt": 1, "worker_id": "w1"}
    assert batch.usage["output_tokens"] == 8


def test_cancel_stops_the_shard_and_finalizes_cancelled(settings, make_batch):
    model = FakeModel(step_delay=0.1)
    made = make_batch([chat_line(f"r{i}", f"hello {i}") for i in range(8)])  # two shards
    batch = _batch(settings, made.batch_id)

    def cancel_soon():
        while not model.generated:
            time.sleep(0.01)
        with session_scope(settings.database_url) as session:
            request_cancel(session=session, tenant_id=batch.tenant_id, batch_id=made.batch_id)

    canceller = threading.Thread(target=cancel_soon)
    canceller.start()
    outcome = _run(settings, made.shard_ids[0], model)
    canceller.join()
    assert outcome.status == "cancelled" and outcome.finalized
    assert 1 <= outcome.written < 4
    # The second shard's message arrives later: nothing to do.
    assert _run(settings, made.shard_ids[1], model).status == "not_claimed"
    with session_scope(settings.database_url) as session:
        statuses = [s.status for s in session.scalars(select(Shard).where(Shard.job_id == made.batch_id)
                                                      .order_by(Shard.index))]
    assert statuses == [ShardStatus.CANCELLED, ShardStatus.CANCELLED]
    batch = _batch(settings, made.batch_id)
    assert batch.status == BatchStatus.CANCELLED and batch.cancelled_at is not None
    done = [line["custom_id"] for line in _file_lines(settings, batch.output_file_id)]
    assert len(done) == outcome.written
    errors = _file_lines(settings, batch.error_file_id)
    assert len(done) + len(errors) == 8
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert all(line["response"] is None for line in errors)


def test_lost_lease_stops_writes(settings, make_batch):
    model = FakeModel(step_delay=0.1)
    made = make_batch([chat_line(f"r{i}", f"hello {i}") for i in range(4)])
    shard_id = made.shard_ids[0]

    def steal():
        while not model.generated:
            time.sleep(0.01)
        with session_scope(settings.database_url) as session:
            session.execute(update(Shard).where(Shard.id == shard_id).values(lease_expires_at=time.time() - 1))
            assert claim_shard(session=session, shard_id=shard_id, worker_id="thief", lease_seconds=60,
                               max_attempts=3, job_runs=batch_runs()) == 2

    thief = threading.Thread(target=steal)
    thief.start()
    outcome = _run(settings, shard_id, model)
    thief.join()
    assert outcome.status == "lease_lost" and not outcome.finalized
    assert outcome.written <= 1
    with session_scope(settings.database_url) as session:
        shard = session.get(Shard, shard_id)
        late = session.scalar(select(func.count()).select_from(RequestResult).where(RequestResult.attempt == 1,
                                                                                   RequestResult.shard_id == shard_id))
    assert (shard.status, shard.attempt, shard.lease_owner) == (ShardStatus.RUNNING, 2, "thief")
    assert late == outcome.written


def test_crash_releases_then_fails_after_max_attempts(settings, make_batch):
    made = make_batch([chat_line("r0", "hi")])

    def broken_loader(_model_id):
        raise OSError("weights unreadable")

    shard_id = made.shard_ids[0]
    statuses = [run_shard(settings=settings, shard_id=shard_id, worker_id="w", model_loader=broken_loader).status
                for _ in range(settings.max_attempts)]
    assert statuses == ["released", "released", "failed"]
    batch = _batch(settings, made.batch_id)
    assert batch.status == BatchStatus.FAILED and batch.errors["data"][0]["code"] == "worker_failed"
    [error] = _file_lines(settings, batch.error_file_id)
    assert error["error"]["code"] == "worker_failed" and "weights unreadable" in error["error"]["message"]


def test_concurrent_finalizers_finalize_once(settings, make_batch, fake_model, monkeypatch):
    from workers.batches import finalize

    made = make_batch([chat_line(f"r{i}", f"hello {i}") for i in range(4)])
    with session_scope(settings.database_url) as session:  # the work is done; nobody finalized yet
        session.execute(update(Shard).where(Shard.job_id == made.batch_id).values(status=ShardStatus.DONE))
    calls = []
    real = finalize.finalize_batch
    monkeypatch.setattr(finalize, "finalize_batch", lambda s, b: (calls.append(b), real(s, b)))
    barrier = threading.Barrier(4)
    won = []

    def race():
        barrier.wait()
        won.append(finalize.maybe_finalize(settings, made.batch_id))

    threads = [threading.Thread(target=race) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False, False, False, True] and calls == [made.batch_id]
    batch = _batch(settings, made.batch_id)
    assert batch.status == BatchStatus.COMPLETED
    # Nothing ran, so the done shards' requests are reported, not silently dropped.
    assert len(_file_lines(settings, batch.error_file_id)) == 4


def test_database_failure_releases_the_shard_without_blaming_requests(settings, make_batch, fake_model, monkeypatch):
    from sqlalchemy.exc import OperationalError

    made = make_batch([chat_line(f"r{i}", f"hello {i}") for i in range(4)])

    def down(**_kwargs):
        raise OperationalError("INSERT", {}, Exception("connection refused"))

    monkeypatch.setattr("workers.batches.shard_runner.record_results", down)
    outcome = _run(settings, made.shard_ids[0], fake_model)
    assert outcome.status == "released" and "could not store" in outcome.error
    assert fake_model.submits == 1  # no resubmission hunting a poison request
    assert _results(settings, made.batch_id) == []
    monkeypatch.undo()
    assert _run(settings, made.shard_ids[0], fake_model).status == "done"
    assert len(_results(settings, made.batch_id)) == 4


def test_attempt_past_its_time_limit_is_released_then_resumed(settings, make_batch):
    made = make_batch([chat_line(f"r{i}", f"hello {i}") for i in range(4)])
    shard_id = made.shard_ids[0]
    slow = FakeModel(step_delay=0.2)  # 0.8 s for the shard
    settings.shard_time_limit_seconds = 0.3
    outcome = _run(settings, shard_id, slow)
    assert outcome.status == "released" and "time limit of 0.3 s" in outcome.error
    assert 0 < outcome.written < 4
    with session_scope(settings.database_url) as session:
        shard = session.get(Shard, shard_id)
    assert (shard.status, shard.lease_owner, shard.attempt) == (ShardStatus.QUEUED, None, 1)  # no orphaned lease
    settings.shard_time_limit_seconds = 60
    resumed = _run(settings, shard_id, slow)
    assert (resumed.status, resumed.attempt, resumed.skipped) == ("done", 2, outcome.written)
    assert [r.custom_id for r in _results(settings, made.batch_id)] == ["r0", "r1", "r2", "r3"]


class WorkerDeath(BaseException):
    """Stands for the process dying (an OOM kill): nothing of run_shard's cleanup runs."""


class DeadlyModel(FakeModel):
    """Kills its "process" whenever a submitted request's prompt holds "deadly"."""

    def submit(self, requests):
        if any(b"deadly" in bytes(t for t in r.prompt_token_ids if t < 256) for r in requests):
            raise WorkerDeath
        return super().submit(requests)


def _die_and_be_reaped(settings, shard_id, model):
    from workers.reaper import reap

    with pytest.raises(WorkerDeath):
        _run(settings, shard_id, model)
    with session_scope(settings.database_url) as session:  # the dead worker's lease runs out
        session.execute(update(Shard).where(Shard.id == shard_id).values(lease_expires_at=0))
    assert reap(settings).redispatched == [shard_id]  # requeued (no broker in these tests to send it)


def test_request_that_kills_its_worker_is_quarantined_and_the_rest_finish(settings, make_batch):
    made = make_batch([chat_line("r0", "hi"), chat_line("r1", "deadly"), chat_line("r2", "ho"),
                       chat_line("r3", "ha")])
    shard_id = made.shard_ids[0]
    model = DeadlyModel()
    _die_and_be_reaped(settings, shard_id, model)  # attempt 1: all four batched together, nothing stored
    _die_and_be_reaped(settings, shard_id, model)  # attempt 2: one at a time; r0 stored, dies on r1
    assert [r.custom_id for r in _results(settings, made.batch_id)] == ["r0"]
    with session_scope(settings.database_url) as session:
        shard = session.get(Shard, shard_id)
        assert (shard.deaths, shard.suspect, shard.status) == (2, "r1", ShardStatus.QUEUED)
    outcome = _run(settings, shard_id, model)  # attempt 3: r1 quarantined, r2 and r3 run
    assert (outcome.status, outcome.attempt, outcome.finalized) == ("done", 3, True)
    batch = _batch(settings, made.batch_id)
    assert batch.status == BatchStatus.COMPLETED
    assert [line["custom_id"] for line in _file_lines(settings, batch.output_file_id)] == ["r0", "r2", "r3"]
    [quarantined] = _file_lines(settings, batch.error_file_id)
    assert quarantined["custom_id"] == "r1"
    assert quarantined["response"]["body"]["error"]["code"] == "request_quarantined"


def test_a_batch_that_cannot_be_finalized_fails_with_the_reason(settings, make_batch, fake_model):
    from workers.batches.finalize import refinalize_stale

    made = make_batch([chat_line(f"r{i}", f"hello {i}") for i in range(2)])
    shard_id = made.shard_ids[0]
    with session_scope(settings.database_url) as session:
        key = session.get(Shard, shard_id).input_key
    store_from_settings(settings).delete(key)  # its input is gone: no attempt, nor the finalizer, can read it
    statuses = [_run(settings, shard_id, fake_model).status for _ in range(settings.max_attempts)]
    assert statuses == ["released", "released", "failed"]
    assert _batch(settings, made.batch_id).status == BatchStatus.FINALIZING  # its first finalization failed
    for _ in range(settings.max_attempts - 1):
        assert refinalize_stale(settings, made.batch_id, older_than_seconds=-1)
    batch = _batch(settings, made.batch_id)
    assert (batch.status, batch.finalize_failures) == (BatchStatus.FAILED, settings.max_attempts)
    error = batch.errors["data"][0]
    assert error["code"] == "finalize_failed" and "StorageKeyNotFound" in error["message"]
    assert key not in error["message"]  # the tenant reads it: no storage keys or SQL
    assert not refinalize_stale(settings, made.batch_id, older_than_seconds=-1)  # never again
