"""End to end, as a user sees it: the openai SDK against `genq api` + `genq worker` subprocesses on
PostgreSQL, Redis and SeaweedFS with the bundled model; `genq run` (embedded) gives the same greedy
text; a cancel mid-run ends in `cancelled` with the finished requests in the output file."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass

import pytest
from sqlalchemy import func, select

from db.models import RequestResult
from db.session import session_scope
from tests.e2e.conftest import REPO, STACK_ENV, catalog_lines, genq, write_jsonl

pytestmark = pytest.mark.slow

FINAL = {"completed", "failed", "expired", "cancelled"}


def wait_for(client, batch_id: str, timeout: float, stack, until=FINAL):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}\n{stack.log_tail()}"
        time.sleep(1)


def jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


@dataclass
class ServerRun:
    lines: list[dict]
    batch: object
    output: list[dict]
    seconds: float


@pytest.fixture(scope="module")
def server_run(stack, tmp_path_factory) -> ServerRun:
    """The 200-line batch through the API and a worker, created, polled and downloaded with the SDK."""
    lines = catalog_lines()
    path = write_jsonl(tmp_path_factory.mktemp("e2e") / "catalog_200.jsonl", lines)
    client = stack.client()
    started = time.monotonic()
    with path.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert batch.status == "in_progress" and batch.request_counts.total == len(lines)
    batch = wait_for(client, batch.id, timeout=1500, stack=stack)
    seconds = time.monotonic() - started
    print(f"\nserver path: {len(lines)} requests in {seconds:.1f}s")
    assert batch.status == "completed", stack.log_tail()
    output = jsonl(client.files.content(batch.output_file_id).read())
    return ServerRun(lines=lines, batch=batch, output=output, seconds=seconds)


@pytest.mark.timeout(1800)  # includes the server_run fixture: ~200 CPU generations
def test_server_batch_completes_with_one_chat_completion_per_request(server_run):
    batch, output, lines = server_run.batch, server_run.output, server_run.lines
    assert len(output) == len(lines) == 200
    assert sorted(line["custom_id"] for line in output) == sorted(line["custom_id"] for line in lines)
    assert batch.request_counts.completed == 200 and batch.request_counts.failed == 0
    assert batch.error_file_id is None
    for line in output:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        assert body["model"] == "smollm2-135m-instruct"
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
        assert choice["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert 0 < usage["completion_tokens"] <= 24 and usage["prompt_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert batch.usage.input_tokens == sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in output)
    assert batch.usage.output_tokens == sum(line["response"]["body"]["usage"]["completion_tokens"] for line in output)
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens


@pytest.mark.timeout(1800)
def test_embedded_run_gives_the_same_greedy_outputs(server_run, stack, tmp_path):
    # The same file with the same shard and batch settings (STACK_ENV): the same computation in
    # another process, so greedy text must match token for token.
    lines = server_run.lines
    path = write_jsonl(tmp_path / "catalog_200.jsonl", lines)
    out = tmp_path / "results" / "catalog.output.jsonl"
    env = {key: value for key, value in stack.env.items()
           if not key.startswith("GENQ_") or key in STACK_ENV}  # no servers named: embedded mode anyway
    started = time.monotonic()
    done = subprocess.run(genq("run", str(path), "-o", str(out), "--home", str(tmp_path / "home")), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    print(f"\nembedded path: {len(lines)} requests in {time.monotonic() - started:.1f}s")
    assert done.returncode == 0, done.stderr[-4000:]
    assert str(out) in done.stderr.replace("\n", "")
    assert not (tmp_path / "results" / "catalog.errors.jsonl").exists()
    embedded = jsonl(out.read_bytes())
    assert [line["custom_id"] for line in embedded] == [line["custom_id"] for line in lines]
    server = {line["custom_id"]: line["response"]["body"] for line in server_run.output}
    for line in embedded:
        mine, theirs = line["response"]["body"], server[line["custom_id"]]
        assert mine["choices"][0]["message"]["content"] == theirs["choices"][0]["message"]["content"], line["custom_id"]
        assert mine["usage"] == theirs["usage"]


def test_cancel_mid_run_stops_writes_and_keeps_finished_requests(stack, tmp_path):
    # One shard of 20 whose max_tokens grow along the file, so results arrive one after another;
    # cancel as soon as the first is stored: the worker stops at its next heartbeat (1 s).
    lines = catalog_lines(20, prefix="cancel-")
    for i, line in enumerate(lines):
        line["body"]["max_tokens"] = 2 + 3 * i
    client = stack.client()
    with write_jsonl(tmp_path / "cancel.jsonl", lines).open("rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 600
    while client.batches.retrieve(batch.id).request_counts.completed == 0:
        assert time.monotonic() < deadline, stack.log_tail()
        time.sleep(0.25)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = wait_for(client, batch.id, timeout=300, stack=stack)
    assert batch.status == "cancelled" and batch.cancelled_at is not None

    def stored() -> tuple[int, int]:
        with session_scope(stack.database_url) as session:
            rows = session.scalar(select(func.count()).where(RequestResult.batch_id == batch.id))
            late = session.scalar(select(func.count()).where(RequestResult.batch_id == batch.id,
                                                              RequestResult.created_at >= batch.cancelled_at + 1))
        return rows, late

    before = stored()
    time.sleep(5)  # several heartbeats and reaper passes
    after = stored()
    assert before == after and after[1] == 0, "a result was stored after the batch was cancelled"
    assert after[0] == 20  # each request: a result or a batch_cancelled error line

    output = jsonl(client.files.content(batch.output_file_id).read())
    errors = jsonl(client.files.content(batch.error_file_id).read())
    counts = batch.request_counts
    assert 1 <= counts.completed < 20
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert counts.completed + counts.failed == 20
    assert all(line["response"]["status_code"] == 200 for line in output)
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert {line["custom_id"] for line in output} | {line["custom_id"] for line in errors} == \
        {line["custom_id"] for line in lines}
