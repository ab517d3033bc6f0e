"""genq's command-line clients against a real deployment (API, a worker, Redis, PostgreSQL, SeaweedFS).

A tiny random model (tests/workers/runtime/tiny_checkpoints.py) keeps this fast on a CPU; what is
under test is the commands, not the text. The fault-injection suite is tests/fault.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.conftest import API_KEY, TINY, Stack, genq, kill_group, server_env, start, write_jsonl
from tests.services import free_port, fresh_postgres_database

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cli_stack(redis_url, s3_server, tiny_models_file, tmp_path_factory):
    with fresh_postgres_database() as postgres_url:
        yield from _cli_stack(postgres_url, redis_url, s3_server, tiny_models_file, tmp_path_factory)


def _cli_stack(postgres_url, redis_url, s3_server, tiny_models_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    port = free_port()
    env = {
        **server_env(postgres_url, redis_url, s3_server, root / "home", port),
        "GENQ_MODELS_FILE": str(tiny_models_file),
        "GENQ_DEVICE": "cpu",
        "GENQ_SHARD_SIZE": "20",
        "GENQ_MAX_BATCH_SIZE": "4",
        "GENQ_LEASE_SECONDS": "3",
        "GENQ_HEARTBEAT_SECONDS": "0.5",
        "GENQ_REAPER_INTERVAL_SECONDS": "0.5",
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


def test_cli_clients_against_the_api(cli_stack, tmp_path):
    """`genq keys create`, `submit --wait`, `status`, `results` and `keys revoke` as a user runs them."""
    import subprocess

    from tests.e2e.conftest import REPO

    stack = cli_stack
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
    time.sleep(5.5)  # the API's key cache (GENQ_API_KEY_CACHE_SECONDS) forgets it
    assert cli("status", batch_id, "--no-watch", env=env).returncode != 0
