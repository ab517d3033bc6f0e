"""Retention on real PostgreSQL/SQLite and SeaweedFS: expired files and old finished batches are
deleted, rows and objects, and the bucket holds nothing that no row names."""

from __future__ import annotations

import io
import time
import uuid

import boto3
import pytest
from sqlalchemy import select, update

from db.files import create_file, file_storage_key, new_file_id
from db.models import Batch, BatchStatus, File, RequestResult, Shard
from db.session import session_scope
from storage import store_from_settings
from tests.workers.conftest import chat_line
from workers.batches.shard_runner import run_shard
from workers.retention import collect


@pytest.fixture
def s3_settings(settings, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    settings.storage_url = f"s3://{s3_server.bucket}/retention-{uuid.uuid4().hex[:8]}"
    settings.s3_endpoint_url = s3_server.endpoint_url
    return settings


def bucket_keys(settings, s3_server) -> set[str]:
    bucket, _, prefix = settings.storage_url.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=s3_server.access_key,
                          aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {item["Key"][len(prefix) + 1:] for page in pages for item in page.get("Contents", [])}


def test_expired_files_and_old_batches_leave_nothing_behind(s3_settings, s3_server, make_batch, fake_model,
                                                            tenant_id):
    settings = s3_settings
    made = make_batch([chat_line(f"r{i}", f"hello {i}") for i in range(6)])
    for shard_id in made.shard_ids:
        run_shard(settings=settings, shard_id=shard_id, worker_id="w", model_loader=lambda _m: fake_model)
    recent = make_batch([chat_line("k", "keep me")])  # finished now: inside its retention
    run_shard(settings=settings, shard_id=recent.shard_ids[0], worker_id="w", model_loader=lambda _m: fake_model)
    store = store_from_settings(settings)
    expiring, lasting = new_file_id(), new_file_id()
    with session_scope(settings.database_url) as session:
        for file_id, expires_at in ((expiring, int(time.time()) - 1), (lasting, int(time.time()) + 3600)):
            store.put_stream(file_storage_key(file_id), io.BytesIO(b"{}\n"))
            create_file(session=session, tenant_id=tenant_id, file_id=file_id, filename="x.jsonl", purpose="batch",
                        size=3, expires_at=expires_at)
        session.execute(update(Batch).where(Batch.id == made.batch_id)
                        .values(completed_at=int(time.time()) - settings.batch_retention_seconds - 10))
        old = session.get(Batch, made.batch_id)
        assert old.status == BatchStatus.COMPLETED
        old_files = [old.output_file_id]
    before = bucket_keys(settings, s3_server)
    assert f"batches/{made.batch_id}/output.jsonl" in before and file_storage_key(expiring) in before

    collected = collect(settings)
    assert collected.files == [expiring] and collected.batches == [made.batch_id]
    after = bucket_keys(settings, s3_server)
    assert not any(key.startswith(f"batches/{made.batch_id}/") for key in after)
    assert file_storage_key(expiring) not in after and file_storage_key(lasting) in after
    assert f"batches/{recent.batch_id}/output.jsonl" in after
    with session_scope(settings.database_url) as session:
        assert session.get(Batch, made.batch_id) is None
        assert session.scalars(select(Shard).where(Shard.job_id == made.batch_id)).all() == []
        assert session.scalars(select(RequestResult).where(RequestResult.batch_id == made.batch_id)).all() == []
        assert session.scalars(select(File).where(File.id.in_([expiring, *old_files]))).all() == []
        named = {row.storage_key for row in session.scalars(select(File))}
        named |= {row.input_key for row in session.scalars(select(Shard))}
    assert after <= named | {f"batches/{recent.batch_id}/output.jsonl"}  # nothing left that no row names
    assert collect(settings) == type(collected)(files=[], batches=[])  # a second pass finds nothing
