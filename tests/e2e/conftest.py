"""A real deployment for the end-to-end tests: `genq api` and `genq worker` subprocesses on
PostgreSQL, Redis and SeaweedFS, driven by the official openai SDK.

Processes start in their own session and are killed by process group, so no pool child survives.
Their logs go to files under the test's tmp dir (printed on failure by the tests that need them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.services import free_port, fresh_postgres_database, wait_healthy

REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
API_KEY = "sk-genq-e2e-" + "0" * 24

# The e2e batches: the first lines of examples/catalog_batch.jsonl, rewritten to fit a 2-core CI
# machine: temperature 0 (greedy, so the embedded run can be compared) and max_tokens 24 (the file asks
# for 96 sampled tokens). Measured on a quiet 2-core box: 200 requests through the servers in ~2 min.
# (Dropping the shared system message, ~130 of each prompt's ~230 tokens, halves that if needed.)
E2E_LINES = 200
E2E_MAX_TOKENS = 24

# Server settings for the e2e deployment (one worker, -c 1). Shards of 50 requests decoded together.
STACK_ENV = {
    "GENQ_SHARD_SIZE": "50",
    "GENQ_MAX_BATCH_SIZE": "50",
    # genq run holds one shard at a time, as the `-c 1` worker does: both engines then see the same
    # steps, so greedy text is equal token for token (bf16 results depend on what shares a matmul).
    "GENQ_WORKER_SHARDS": "1",
    "GENQ_LEASE_SECONDS": "30",
    "GENQ_HEARTBEAT_SECONDS": "1",
    "GENQ_REAPER_INTERVAL_SECONDS": "2",
    "GENQ_DEVICE": "cpu",
}


def catalog_lines(n: int = E2E_LINES, max_tokens: int = E2E_MAX_TOKENS, prefix: str = "") -> list[dict]:
    lines = []
    with (REPO / "examples" / "catalog_batch.jsonl").open() as f:
        for raw in f:
            line = json.loads(raw)
            line["custom_id"] = prefix + line["custom_id"]
            line["body"].update(temperature=0, max_tokens=max_tokens)
            line["body"].pop("top_p", None)
            lines.append(line)
            if len(lines) == n:
                break
    return lines


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@dataclass
class Stack:
    """A running genq deployment."""

    base_url: str  # ".../v1"
    api_key: str
    database_url: str
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=5, timeout=60)

    def log_tail(self, chars: int = 4000) -> str:
        logs = sorted(self.logs.glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs)


def wait_status(retrieve, final: tuple[str, ...], timeout: float, what: str):
    """retrieve() until its .status is one of final (an SDK object: a batch, a fine-tuning job)."""
    deadline = time.monotonic() + timeout
    while (obj := retrieve()).status not in final:
        assert time.monotonic() < deadline, f"{what} still {obj.status} after {timeout} s"
        time.sleep(1)
    return obj


def genq(*args: str) -> list[str]:
    return [sys.executable, "-m", "genq.cli", *args]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("wb")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it after grace seconds (Celery pool children included)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # anything left in the group, even if the leader exited
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


TINY = "tiny-e2e"


@pytest.fixture(scope="session")
def tiny_models_file(tmp_path_factory) -> Path:
    """A models file naming TINY: a random 2-layer byte-level model (tests/workers/runtime/tiny_checkpoints.py).

    Fast on a CPU; for tests of the machinery (leases, cancel, CLI), not of the text."""
    from tests.workers.runtime.tiny_checkpoints import random_hf_state, tiny_hf_config, write_hf_dir

    root = tmp_path_factory.mktemp("tiny-model")
    config = tiny_hf_config(context=1024)
    model_dir = write_hf_dir(root / "tiny", config, random_hf_state(config))
    models_file = root / "models.json"
    models_file.write_text(json.dumps({TINY: {"source": str(model_dir), "context_length": 1024}}))
    return models_file


def server_env(postgres_url: str, redis_url: str, s3_server, home: Path, port: int) -> dict[str, str]:
    """Environment of a server-mode deployment: PostgreSQL, Redis, SeaweedFS, a bootstrap key."""
    return {
        **os.environ,
        "GENQ_DATABASE_URL": postgres_url,
        "GENQ_BROKER_URL": redis_url,
        "GENQ_STORAGE_URL": f"s3://{s3_server.bucket}/genq",
        "GENQ_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "GENQ_BOOTSTRAP_API_KEY": API_KEY,
        "GENQ_HOME": str(home),
        "GENQ_API_PORT": str(port),
    }


@pytest.fixture(scope="session")
def stack_postgres_url() -> Iterator[str]:
    """The main stack's own database (its reaper must not touch the in-process tests' rows)."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def stack(stack_postgres_url, redis_url, s3_server, tmp_path_factory) -> Iterator[Stack]:
    postgres_url = stack_postgres_url
    home = tmp_path_factory.mktemp("genq-home")
    logs = tmp_path_factory.mktemp("e2e-logs")
    port = free_port()
    env = {**server_env(postgres_url, redis_url, s3_server, home, port), **STACK_ENV}
    stack = Stack(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, database_url=postgres_url, env=env,
                  logs=logs)
    try:
        stack.processes.append(start(genq("api"), env, logs / "api.log"))
        stack.processes.append(start(genq("worker", "--models", MODEL, "-c", "1", "--loglevel", "INFO"), env,
                                     logs / "worker.log"))
        if not wait_healthy(port, 60, tuple(stack.processes)):
            raise RuntimeError(f"the genq stack did not start\n{stack.log_tail()}")
        yield stack
    finally:
        for process in stack.processes:
            kill_group(process)
