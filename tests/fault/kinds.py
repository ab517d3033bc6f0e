"""The job kinds the fault suite runs, and the promises checked on each one's final files and rows.

A new job kind (fine-tuning, image generation) is a new JobKind here: every fault test then runs it.

Promises, checked on what a user and the database hold at the end, never on logs:
- every request is answered exactly once across the output and error files, and has one result row;
- the job is finalized once (one output file row, at most one error file row, counts that add up);
- no shard is left running or leased;
- no file row points at a missing object, or at one whose size differs from the row's.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import boto3
from sqlalchemy import select

from db.models import Batch, File, RequestResult, Shard, ShardStatus
from db.session import session_scope
from tests.e2e.conftest import TINY
from tests.fault.harness import Deployment, wait_for

FINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class Job:
    id: str
    request_ids: list[str]  # what the user asked for, in input order


class JobKind(Protocol):
    name: str

    def submit(self, deployment: Deployment, count: int, poison_at: int | None = None) -> Job:
        """Creates a job of count requests (request poison_at, if given, crashes the worker running it)."""

    def wait(self, deployment: Deployment, job: Job, timeout: float = 240) -> str:
        """Waits for a final status and returns it."""

    def progress(self, deployment: Deployment, job: Job) -> int:
        """Requests answered so far (result rows)."""

    def check_promises(self, deployment: Deployment, job: Job) -> dict[str, int]:
        """Asserts the promises; returns {"succeeded": n, "failed": n} per the final files."""


POISON = "POISON-PILL"  # tests/fault/poison_worker.py kills its process on a prompt holding this


class ChatBatch:
    """An OpenAI chat-completions batch on the tiny model."""

    name = "chat_batch"

    def submit(self, deployment: Deployment, count: int, poison_at: int | None = None) -> Job:
        ids = [f"req-{i:03d}" for i in range(count)]
        lines = [{"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": TINY, "temperature": 0, "max_tokens": 48,
                           "messages": [{"role": "user", "content": POISON if i == poison_at else f"count to {i}"}]}}
                 for i, custom_id in enumerate(ids)]
        client = deployment.client()
        content = "".join(json.dumps(line) + "\n" for line in lines).encode()
        uploaded = client.files.create(file=("in.jsonl", content), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", extra_headers={"Idempotency-Key": uploaded.id})
        return Job(batch.id, ids)

    def wait(self, deployment: Deployment, job: Job, timeout: float = 240) -> str:
        client = deployment.client()
        return wait_for(lambda: (s := client.batches.retrieve(job.id).status) in FINAL and s, timeout,
                        f"batch {job.id} to finish", 0.3, deployment.log_tail)

    def progress(self, deployment: Deployment, job: Job) -> int:
        with session_scope(deployment.database_url) as session:
            return len(session.scalars(select(RequestResult.id).where(RequestResult.batch_id == job.id)).all())

    def check_promises(self, deployment: Deployment, job: Job) -> dict[str, int]:
        client = deployment.client()
        batch = client.batches.retrieve(job.id)
        answered: Counter[str] = Counter()
        per_file = {}
        for kind, file_id in (("succeeded", batch.output_file_id), ("failed", batch.error_file_id)):
            lines = [json.loads(x) for x in client.files.content(file_id).read().splitlines()] if file_id else []
            answered.update(line["custom_id"] for line in lines)
            per_file[kind] = len(lines)
        assert sorted(answered) == sorted(job.request_ids), "a request is missing from both files, or extra"
        assert max(answered.values()) == 1, f"answered twice: {[c for c, n in answered.items() if n > 1]}"
        counts = batch.request_counts
        assert (counts.total, counts.completed, counts.failed) == (
            len(job.request_ids), per_file["succeeded"], per_file["failed"])
        with session_scope(deployment.database_url) as session:
            results = session.scalars(select(RequestResult.custom_id).where(RequestResult.batch_id == job.id)).all()
            shards = session.scalars(select(Shard).where(Shard.job_id == job.id)).all()
            row = session.get(Batch, job.id)
            files = session.scalars(select(File).where(File.filename.startswith(job.id))).all()
            every_file = session.scalars(select(File)).all()
        assert sorted(results) == sorted(job.request_ids)
        assert all(s.status in (ShardStatus.DONE, ShardStatus.FAILED, ShardStatus.CANCELLED) and s.lease_owner is None
                   for s in shards), [(s.id, s.status, s.lease_owner) for s in shards]
        assert row.output_file_id is not None and sorted(f.id for f in files) == sorted(
            i for i in (row.output_file_id, row.error_file_id) if i), "finalized more than once, or not at all"
        _assert_objects_exist(deployment, every_file)
        return per_file


def _assert_objects_exist(deployment: Deployment, files: list[File]) -> None:
    env = deployment.env
    bucket, _, prefix = env["GENQ_STORAGE_URL"].removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=env["GENQ_S3_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    for file in files:
        key = f"{prefix}/{file.storage_key}" if prefix else file.storage_key
        try:
            size = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
        except s3.exceptions.ClientError as exc:
            raise AssertionError(f"file row {file.id} points at a missing object {key}: {exc}") from exc
        assert size == file.bytes, f"file row {file.id}: {file.bytes} bytes, its object {size}"


KINDS: list[JobKind] = [ChatBatch()]
