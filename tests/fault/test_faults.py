"""The fault table of shared/reference/celery-reliability.md section 8, on real processes and services.

Every test breaks one thing mid-job, lets genq recover, and asserts the promises of kinds.py on the
final files and rows. Each runs for every job kind in kinds.KINDS. `make test-fault` runs them all;
the ones marked `fault_full` (slow outages, restarts of private servers) are left out of `make test`.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from db.models import File, RequestResult, Shard, ShardStatus
from db.session import get_engine, session_scope
from genq.settings import Settings
from tests.e2e.conftest import TINY
from tests.fault.harness import Deployment, wait_for
from tests.fault.kinds import KINDS, JobKind
from workers.dispatch import enqueue_shards, queue_for_model

pytestmark = [pytest.mark.slow, pytest.mark.fault]
each_kind = pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
REQUESTS = 24  # three shards of eight
POISON_WORKER = Path(__file__).parent / "poison_worker.py"


def mid_job(kind: JobKind, d: Deployment, job, at_least: int = 1) -> int:
    """Waits until the job has stored some results but not all; returns how many."""
    done = wait_for(lambda: kind.progress(d, job) >= at_least and kind.progress(d, job), 180,
                    "the first results", 0.05, d.log_tail)
    assert done < len(job.request_ids), "the job finished before the fault; make it longer"
    return done


def attempts(d: Deployment, job) -> dict[str, int]:
    with session_scope(d.database_url) as session:
        return dict(session.execute(select(RequestResult.custom_id, RequestResult.attempt)
                                    .where(RequestResult.batch_id == job.id)).all())


def shards(d: Deployment, job) -> list[Shard]:
    with session_scope(d.database_url) as session:
        return list(session.scalars(select(Shard).where(Shard.job_id == job.id).order_by(Shard.index)))


@each_kind
def test_kill_9_worker_group_mid_shard(deploy, kind) -> None:
    """Parent, pool and reaper die at once: no ack, no cleanup. The lease expires, the reaper re-sends,
    another worker resumes after the stored results; nothing is redone."""
    d = deploy()
    d.start_worker("first")
    job = kind.submit(d, REQUESTS)
    mid_job(kind, d, job)
    d.kill_worker("first")
    before = attempts(d, job)
    d.start_worker("second")
    assert kind.wait(d, job) == "completed"
    assert kind.check_promises(d, job) == {"succeeded": REQUESTS, "failed": 0}
    after = attempts(d, job)
    assert {c: a for c, a in after.items() if c in before} == before  # what attempt 1 stored was kept
    assert max(s.attempt for s in shards(d, job)) == 2


def _pool_children(parent_pid: int) -> list[int]:
    children = Path(f"/proc/{parent_pid}/task/{parent_pid}/children").read_text().split()
    return [int(pid) for pid in children
            if b"reaper" not in Path(f"/proc/{pid}/cmdline").read_bytes()]


@each_kind
def test_kill_9_pool_child_mid_shard(deploy, kind) -> None:
    """A prefork child dies (OOM-killed): Celery requeues its message, the parent forks a new child."""
    d = deploy()
    worker = d.start_worker("prefork", "--pool", "prefork")
    job = kind.submit(d, REQUESTS)
    mid_job(kind, d, job)
    [child] = _pool_children(worker.pid)
    import os

    os.kill(child, signal.SIGKILL)
    assert kind.wait(d, job) == "completed"
    assert kind.check_promises(d, job) == {"succeeded": REQUESTS, "failed": 0}
    assert worker.poll() is None, "the worker parent should survive its child"
    assert max(s.attempt for s in shards(d, job)) == 2


@each_kind
def test_sigterm_mid_shard_finishes_or_releases(deploy, kind) -> None:
    """Warm shutdown: the worker stops within its soft-shutdown timeout; the shard is finished or handed
    back, and another worker completes the job."""
    d = deploy()
    first = d.start_worker("first")
    job = kind.submit(d, REQUESTS)
    mid_job(kind, d, job)
    d.kill_worker("first", signal.SIGTERM)
    first.wait(timeout=30)  # soft shutdown is 2 s here
    d.start_worker("second")
    assert kind.wait(d, job) == "completed"
    assert kind.check_promises(d, job) == {"succeeded": REQUESTS, "failed": 0}


@each_kind
def test_same_message_delivered_twice(deploy, kind) -> None:
    """Every shard's message is sent twice more while two workers listen: one execution each."""
    d = deploy()
    d.start_worker("a")
    d.start_worker("b")
    job = kind.submit(d, REQUESTS)
    mid_job(kind, d, job)
    settings = Settings(broker_url=d.redis.url)
    again = [(s.id, queue_for_model(TINY)) for s in shards(d, job)]
    assert enqueue_shards(settings, again + again) == 2 * len(again)
    assert kind.wait(d, job) == "completed"
    assert kind.check_promises(d, job) == {"succeeded": REQUESTS, "failed": 0}
    assert set(attempts(d, job).values()) == {1}  # no shard ran twice
    assert [s.attempt for s in shards(d, job)] == [1] * len(again)


@each_kind
def test_redis_flushed_mid_job(deploy, kind) -> None:
    """The queued shards' messages vanish: the reaper sees queued shards the broker does not hold and
    sends them again."""
    d = deploy()
    d.start_worker("w")
    job = kind.submit(d, REQUESTS)
    mid_job(kind, d, job)
    d.redis.flush()
    assert kind.wait(d, job) == "completed"
    assert kind.check_promises(d, job) == {"succeeded": REQUESTS, "failed": 0}


@each_kind
def test_redis_restarted_empty_mid_job(deploy, kind) -> None:
    """Redis dies and comes back empty: the worker reconnects, the running shard goes on (its lease is in
    SQL), the lost messages are re-sent."""
    d = deploy()
    d.start_worker("w")
    job = kind.submit(d, REQUESTS)
    mid_job(kind, d, job)
    d.redis.stop()
    time.sleep(2)
    d.redis.start()
    assert kind.wait(d, job) == "completed"
    assert kind.check_promises(d, job) == {"succeeded": REQUESTS, "failed": 0}


@each_kind
def test_redis_down_at_submit(deploy, kind) -> None:
    """A job created while the broker is down is kept in SQL (the outbox) and sent once it is back."""
    d = deploy()
    d.redis.stop()
    job = kind.submit(d, 8)
    d.redis.start()
    d.start_worker("w")
    assert kind.wait(d, job) == "completed"
    assert kind.check_promises(d, job) == {"succeeded": 8, "failed": 0}


@each_kind
def test_cancel_mid_run(deploy, kind) -> None:
    """Cancel stops the running shard within a heartbeat; what finished is in the output file, every
    other request has a batch_cancelled line; nothing is written after the cancel settles."""
    d = deploy()
    d.start_worker("w")
    job = kind.submit(d, REQUESTS)
    mid_job(kind, d, job)
    d.client().batches.cancel(job.id)
    assert kind.wait(d, job, timeout=60) == "cancelled"
    got = kind.check_promises(d, job)
    assert got["succeeded"] < REQUESTS and got["succeeded"] + got["failed"] == REQUESTS
    settled = kind.progress(d, job)
    time.sleep(2)
    assert kind.progress(d, job) == settled


@each_kind
def test_poison_request_is_quarantined_and_the_rest_finish(deploy, kind) -> None:
    """One request kills every worker that runs it. After the first death its shard runs one request at
    a time; the second death names it; the third attempt quarantines it alone."""
    d = deploy()
    job = kind.submit(d, REQUESTS, poison_at=11)  # in the second shard
    deaths = 0
    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline:
        worker = d.start_worker(f"w{deaths}", script=POISON_WORKER)
        while worker.poll() is None:
            status = d.client().batches.retrieve(job.id).status
            if status in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.2)
        if status in ("completed", "failed", "cancelled"):
            break
        deaths += 1  # a supervisor (systemd, Kubernetes) starts a new worker
    assert status == "completed", d.log_tail()
    assert deaths == 2
    got = kind.check_promises(d, job)
    assert got == {"succeeded": REQUESTS - 1, "failed": 1}
    errors = [line for line in _lines(d, job, "error") if line["custom_id"] == "req-011"]
    assert errors[0]["response"]["body"]["error"]["code"] == "request_quarantined"


def _lines(d: Deployment, job, which: str) -> list[dict]:
    import json

    client = d.client()
    batch = client.batches.retrieve(job.id)
    file_id = batch.output_file_id if which == "output" else batch.error_file_id
    return [json.loads(x) for x in client.files.content(file_id).read().splitlines()] if file_id else []


@each_kind
def test_time_limit_exceeded_releases_and_resumes(deploy, kind) -> None:
    """An attempt past GENQ_SHARD_TIME_LIMIT_SECONDS stops, is released (no orphaned lease) and the next
    attempt resumes after what it stored."""
    d = deploy(GENQ_SHARD_TIME_LIMIT_SECONDS="0.6", GENQ_SHARD_SIZE="24", GENQ_MAX_ATTEMPTS="20")
    d.start_worker("w")
    job = kind.submit(d, REQUESTS)
    assert kind.wait(d, job) == "completed"
    assert kind.check_promises(d, job) == {"succeeded": REQUESTS, "failed": 0}
    [shard] = shards(d, job)
    assert shard.attempt > 1 and shard.deaths == 0 and shard.lease_owner is None  # released each time, not lost
    assert len(set(attempts(d, job).values())) > 1  # results came from several attempts, none twice


@pytest.mark.fault_full
@each_kind
def test_postgres_restarted_mid_job(deploy, kind) -> None:
    """The database goes away for a few seconds (a private cluster, restarted with pg_ctl): writes retry
    inside the lease, or the lease is lost and the reaper recovers; nothing is lost or doubled."""
    d = deploy(private_postgres=True)
    d.start_worker("w")
    job = kind.submit(d, REQUESTS)
    mid_job(kind, d, job)
    d.postgres.stop()
    time.sleep(5)
    d.postgres.start()
    get_engine(d.database_url).dispose()  # this test process's own connections died with the server
    assert kind.wait(d, job) == "completed"
    assert kind.check_promises(d, job) == {"succeeded": REQUESTS, "failed": 0}


@pytest.mark.fault_full
@each_kind
def test_s3_down_for_30_seconds(deploy, kind) -> None:
    """Storage stops for 30 s mid-job: reads and writes of shard inputs and outputs wait for it; no
    attempt is burned on the outage and no row points at a missing object."""
    d = deploy(private_s3=True)
    d.start_worker("w")
    job = kind.submit(d, REQUESTS)
    mid_job(kind, d, job)
    d.s3.stop()
    time.sleep(30)
    d.s3.start()
    d.s3.wait_ready()
    assert kind.wait(d, job) == "completed"
    assert kind.check_promises(d, job) == {"succeeded": REQUESTS, "failed": 0}
    assert all(s.status == ShardStatus.DONE for s in shards(d, job))


@pytest.mark.fault_full
def test_api_killed_mid_upload_leaves_nothing(deploy) -> None:
    """The API dies while a client streams an upload: no file row, nothing the user can see, and the
    restarted API takes the same upload whole."""
    d = deploy()
    body = b"".join(b'{"custom_id": "r%d", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n' % i
                    for i in range(20_000))

    def slow_chunks():
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]
            time.sleep(0.05)

    boundary = "fault-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--{boundary}\r\n'
            'Content-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n').encode()

    def stream():
        yield head
        yield from slow_chunks()
        yield f"\r\n--{boundary}--\r\n".encode()

    import threading

    outcome = {}

    def upload():
        try:
            outcome["response"] = httpx.post(f"{d.base_url}/files", content=stream(), timeout=60, headers={
                "Authorization": f"Bearer {d.api_key}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=upload)
    thread.start()
    time.sleep(1.0)
    d.kill_api()
    thread.join(timeout=60)
    assert "error" in outcome, outcome
    d.start_api()
    client = d.client()
    assert client.files.list().data == []
    with session_scope(d.database_url) as session:
        assert session.scalars(select(File)).all() == []
    uploaded = client.files.create(file=("big.jsonl", body), purpose="batch")
    assert uploaded.bytes == len(body)
