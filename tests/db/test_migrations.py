"""Alembic migrations: the models match the newest schema, and upgrading keeps existing batches."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from db.migrate import alembic_config, upgrade_to_head
from db.models import Base
from db.session import normalize_url
from tests import services


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'genq.db'}"
        return
    url = services.create_database()
    yield url
    services.drop_database(url)


def test_models_match_the_migrated_schema(empty_url) -> None:
    upgrade_to_head(empty_url)
    engine = create_engine(normalize_url(empty_url))
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def test_upgrade_keeps_batches_as_jobs_and_fills_shard_counters(empty_url) -> None:
    command.upgrade(alembic_config(empty_url), "0001")
    engine = create_engine(normalize_url(empty_url))
    with engine.begin() as conn:  # a finished batch and a running one, as 0001 stored them
        conn.execute(text("INSERT INTO tenants VALUES ('t1', 'acme', 1)"))
        for batch_id, status in (("batch_done", "completed"), ("batch_run", "in_progress")):
            conn.execute(text(
                "INSERT INTO batches (id, tenant_id, input_file_id, endpoint, completion_window, status, model, "
                "request_total, created_at) VALUES (:id, 't1', 'file-1', '/v1/chat/completions', '24h', :status, "
                "'m', 3, 1)"), {"id": batch_id, "status": status})
        for shard_id, batch_id in ((1, "batch_done"), (2, "batch_run")):
            conn.execute(text(
                "INSERT INTO shards (id, batch_id, \"index\", model, queue, input_key, request_count, status, "
                "attempt, created_at, updated_at) VALUES (:id, :batch, 0, 'm', 'q', 'k', 3, 'done', 1, 1, 1)"),
                {"id": shard_id, "batch": batch_id})
        results = [(1, "batch_done", "a", "succeeded", 10, 5), (1, "batch_done", "b", "succeeded", 11, 6),
                   (1, "batch_done", "c", "failed", 0, 0), (2, "batch_run", "a", "succeeded", 7, 3)]
        for number, (shard_id, batch_id, custom_id, outcome, prompt, completion) in enumerate(results, start=1):
            conn.execute(text(
                "INSERT INTO request_results (batch_id, shard_id, custom_id, line_number, outcome, output_line, "
                "prompt_tokens, completion_tokens, attempt, created_at) VALUES (:b, :s, :c, :n, :o, '{}', :p, :q, "
                "1, 1)"), {"b": batch_id, "s": shard_id, "c": custom_id, "n": number, "o": outcome, "p": prompt,
                           "q": completion})
    upgrade_to_head(empty_url)
    with engine.connect() as conn:
        counters = conn.execute(text("SELECT id, succeeded, failed, prompt_tokens, completion_tokens FROM shards "
                                     "ORDER BY id")).all()
        batches = conn.execute(text("SELECT id, status, request_total FROM batches ORDER BY id")).all()
        kept = conn.execute(text("SELECT count(*) FROM request_results")).scalar()
        jobs = conn.execute(text("SELECT id, tenant_id, kind, created_at FROM jobs ORDER BY id")).all()
        shard_jobs = conn.execute(text("SELECT id, job_id FROM shards ORDER BY id")).all()
    engine.dispose()
    # 0003: every batch is a job of kind batch, and its shards reference that job.
    assert [tuple(row) for row in jobs] == [("batch_done", "t1", "batch", 1), ("batch_run", "t1", "batch", 1)]
    assert [tuple(row) for row in shard_jobs] == [(1, "batch_done"), (2, "batch_run")]
    assert [tuple(row) for row in counters] == [(1, 2, 1, 21, 11), (2, 1, 0, 7, 3)]
    assert [tuple(row) for row in batches] == [("batch_done", "completed", 3), ("batch_run", "in_progress", 3)]
    assert kept == 4
