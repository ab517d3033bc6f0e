"""Fault injection with real processes: kill -9 a worker's whole process group mid-shard; a new worker
and the reaper finish the batch, resuming after the stored results, each request written once.

A tiny random model (tests/workers/runtime/tiny_checkpoints.py) keeps this fast on a CPU; what is
under test is the lease, fencing and re-dispatch machinery, not the text.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from sqlalchemy import select

from db.models import File, RequestResult, Shard
from db.session import session_scope
from tests.e2e.conftest import API_KEY, TINY, Stack, genq, kill_group, server_env, start, write_jsonl
from tests.services import free_port, fresh_postgres_database

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fault_stack(redis_url, s3_server, tiny_models_file, tmp_path_factory):
    with fresh_postgres_database() as postgres_url:
        yield from _fault_stack(postgres_url, redis_url, s3_server, tiny_models_file, tmp_path_factory)


def _fault_stack(postgres_url, redis_url, s3_server, tiny_models_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    port = free_port()
    env = {
        **server_env(postgres_url, redis_url, s3_server, root / "home", port),
        # The same store as the main e2e stack: its reaper may finalize these batches too.
        "GENQ_MODELS_FILE": str(tiny_models_file),
        "GENQ_DEVICE": "cpu",
        "GENQ_SHARD_SIZE": "20",
        "GENQ_MAX_BATCH_SIZE": "4",  # results land four at a time, so the kill comes mid-shard
        "GENQ_LEASE_SECONDS": "3",
        "GENQ_HEARTBEAT_SECONDS": "0.5",
        "GENQ_REAPER_INTERVAL_SECONDS": "0.5",
        "GENQ_VISIBILITY_TIMEOUT_SECONDS": "5",  # Redis also redelivers the dead worker's message
    }
    logs = root / "logs"
    logs.mkdir()
    stack = Stack(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, database_url=postgres_url, env=env,
                  logs=logs)
    stack.processes.append(start(genq("api"), env, logs / "api.log"))
    try:
        yield stack
    finally:
        for process in stack.processes:
            kill_group(process, grace=5)


def test_kill_9_mid_shard_resumes_on_another_worker(fault_stack, tmp_path):
    stack = fault_stack
    lines = [{"custom_id": f"k{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": TINY, "messages": [{"role": "user", "content": f"count to {i}"}], "temperature": 0,
                       "max_tokens": 40}} for i in range(20)]
    first = start(genq("worker", "--models", TINY, "-c", "1", "-n", "first@%h"), stack.env, stack.logs / "worker1.log")
    stack.processes.append(first)
    client = stack.client()
    deadline = time.monotonic() + 60
    while True:  # the API may still be starting
        try:
            with write_jsonl(tmp_path / "in.jsonl", lines).open("rb") as f:
                uploaded = client.files.create(file=f, purpose="batch")
            break
        except Exception:
            assert time.monotonic() < deadline, stack.log_tail()
            time.sleep(0.5)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")

    def rows() -> list[tuple[str, int, str]]:
        with session_scope(stack.database_url) as session:
            return list(session.execute(select(RequestResult.custom_id, RequestResult.attempt, RequestResult.worker_id)
                                        .where(RequestResult.batch_id == batch.id)).all())

    deadline = time.monotonic() + 300
    while not rows():
        assert time.monotonic() < deadline, stack.log_tail()
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # parent, pool child and reaper: no warm shutdown, no ack
    first.wait(timeout=10)
    at_kill = rows()
    assert 0 < len(at_kill) < 20, "the shard finished before the kill; slow the tiny model down"

    second = start(genq("worker", "--models", TINY, "-c", "1", "-n", "second@%h"), stack.env,
                   stack.logs / "worker2.log")
    stack.processes.append(second)
    deadline = time.monotonic() + 300
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, stack.log_tail()
        time.sleep(0.5)
    assert batch.status == "completed", stack.log_tail()
    final = rows()
    assert sorted(c for c, _, _ in final) == sorted(line["custom_id"] for line in lines)  # each exactly once
    assert {(c, a, w) for c, a, w in at_kill} <= set(final)  # what attempt 1 stored was kept, not redone
    assert {a for _, a, _ in final} == {1, 2}
    with session_scope(stack.database_url) as session:
        shard = session.scalars(select(Shard).where(Shard.batch_id == batch.id)).one()
        outputs = session.scalars(select(File).where(File.id == batch.output_file_id)).all()
    assert (shard.status.value, shard.attempt) == ("done", 2)
    assert len(outputs) == 1
    output = [json.loads(x) for x in client.files.content(batch.output_file_id).read().splitlines()]
    assert sorted(line["custom_id"] for line in output) == sorted(line["custom_id"] for line in lines)
    assert batch.request_counts.completed == 20 and batch.request_counts.failed == 0


def test_cli_clients_against_the_api(fault_stack, tmp_path):
    """`genq keys create`, `submit --wait`, `status`, `results` and `keys revoke` as a user runs them."""
    import subprocess

    from tests.e2e.conftest import REPO

    stack = fault_stack
    worker = start(genq("worker", "--models", TINY, "-c", "1", "-n", "cli@%h"), stack.env, stack.logs / "worker3.log")
    stack.processes.append(worker)

    def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(genq(*args), cwd=REPO, env=env or stack.env, capture_output=True, text=True, timeout=300)

    created = cli("keys", "create", "--tenant", "cli-user")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    env = {**stack.env, "GENQ_API_BASE": stack.base_url, "GENQ_API_KEY": secret}
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": TINY, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 5}}
             for i in range(4)]
    submitted = cli("submit", str(write_jsonl(tmp_path / "in.jsonl", lines)), "--wait", env=env)
    assert submitted.returncode == 0, submitted.stderr + stack.log_tail()
    batch_id = submitted.stdout.strip().splitlines()[0]
    assert batch_id.startswith("batch_") and "completed" in submitted.stderr
    status = cli("status", batch_id, "--no-watch", env=env)
    assert status.returncode == 0 and "completed; 4 succeeded, 0 failed of 4" in status.stderr.replace("\n", " ")
    out = tmp_path / "got" / "res.output.jsonl"
    fetched = cli("results", batch_id, "-o", str(out), env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == ["c0", "c1", "c2", "c3"]
    listed = cli("status", env=env)
    assert listed.returncode == 0 and batch_id in listed.stdout
    key_id = created.stderr.split()[1]
    assert cli("keys", "revoke", key_id).returncode == 0
    assert cli("status", batch_id, "--no-watch", env=env).returncode != 0
