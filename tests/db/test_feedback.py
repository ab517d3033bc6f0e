"""db/feedback on both databases genq runs on: the upsert (dialect-specific), paging and the export's join."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import delete, select

from db.batches import NewShard, add_batch, add_shards, new_batch_id
from db.feedback import (
    BatchFeedback,
    NewRating,
    known_custom_ids,
    list_ratings,
    ratings_with_results,
    upsert_ratings,
)
from db.leases import ResultRow, record_unfenced_results
from db.migrate import upgrade_to_head
from db.models import Batch, RequestOutcome, Tenant
from db.session import get_sessionmaker
from db.tenants import create_tenant

IDS = [f"r{n}" for n in range(1, 1206)]  # past one IN (...) chunk


@pytest.fixture(params=["postgres", "sqlite"])
def rated_batch(request, tmp_path):
    """(session, tenant id, batch id): a batch whose 1,205 requests all have results (r3 failed) in two shards."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'genq.db'}"
        upgrade_to_head(url)
    with get_sessionmaker(url)() as session:
        tenant = create_tenant(session=session, name=f"t-{uuid.uuid4().hex[:8]}")
        batch = add_batch(session=session, batch_id=new_batch_id(), tenant_id=tenant.id, input_file_id="file-x",
                          endpoint="/v1/chat/completions", completion_window="24h", model="m", metadata=None,
                          request_total=len(IDS), expires_in_seconds=86400)
        shards = add_shards(session=session, batch_id=batch.id, shards=[
            NewShard(index=i, model="m", queue="genq.m", input_key=f"batches/{batch.id}/shards/{i:05d}.jsonl",
                     request_count=n) for i, n in enumerate((600, len(IDS) - 600))])
        for shard, ids in ((shards[0], IDS[:600]), (shards[1], IDS[600:])):
            record_unfenced_results(session=session, batch_id=batch.id, shard_id=shard.id, attempt=1, worker_id="w",
                                    results=[ResultRow(custom_id=cid, line_number=int(cid[1:]),
                                                       outcome=RequestOutcome.FAILED if cid == "r3"
                                                       else RequestOutcome.SUCCEEDED, output_line={"custom_id": cid})
                                             for cid in ids])
        session.commit()
        yield session, tenant.id, batch.id
        session.rollback()
        session.execute(delete(Tenant).where(Tenant.id == tenant.id))
        session.commit()


def rating(custom_id: str, value: str, score: int, corrected: str | None = None) -> NewRating:
    return NewRating(custom_id=custom_id, rating=value, score=score, corrected=corrected, comment=None)


def test_known_custom_ids(rated_batch) -> None:
    session, _, batch_id = rated_batch
    assert known_custom_ids(session=session, batch_id=batch_id, custom_ids=[*IDS, "nope", "r1"]) == set(IDS)


def test_a_later_rating_replaces_the_earlier_one(rated_batch) -> None:
    session, tenant_id, batch_id = rated_batch
    first = upsert_ratings(session=session, tenant_id=tenant_id, batch_id=batch_id,
                           ratings=[rating("r2", "good", 5), rating("r1", "3", 3)])
    session.commit()
    assert [(row.custom_id, row.rating, row.score) for row in first] == [("r2", "good", 5), ("r1", "3", 3)]
    row_id, created = first[0].id, first[0].created_at
    again = upsert_ratings(session=session, tenant_id=tenant_id, batch_id=batch_id,
                           ratings=[rating("r2", "4", 4), rating("r2", "bad", 1, corrected="better"),
                                    rating("r5", "2", 2)])
    session.commit()
    assert [(row.custom_id, row.rating, row.score, row.corrected) for row in again] == [
        ("r2", "bad", 1, "better"), ("r5", "2", 2, None)]
    stored = session.scalars(select(BatchFeedback).where(BatchFeedback.batch_id == batch_id)
                             .order_by(BatchFeedback.id)).all()
    assert [(row.custom_id, row.rating) for row in stored] == [("r2", "bad"), ("r1", "3"), ("r5", "2")]
    assert (stored[0].id, stored[0].created_at) == (row_id, created)


def test_many_ratings_in_one_call_and_pages(rated_batch) -> None:
    session, tenant_id, batch_id = rated_batch
    stored = upsert_ratings(session=session, tenant_id=tenant_id, batch_id=batch_id,
                            ratings=[rating(cid, "good", 5) for cid in IDS])
    session.commit()
    assert [row.custom_id for row in stored] == IDS
    page, more = list_ratings(session=session, tenant_id=tenant_id, batch_id=batch_id, limit=1000)
    assert [row.custom_id for row in page] == IDS[:1000] and more
    rest, more = list_ratings(session=session, tenant_id=tenant_id, batch_id=batch_id, after_id=page[-1].id,
                              limit=1000)
    assert [row.custom_id for row in rest] == IDS[1000:] and not more
    assert list_ratings(session=session, tenant_id="tenant_other", batch_id=batch_id) == ([], False)


def test_ratings_with_results_join_each_rating_to_its_result_and_shard(rated_batch) -> None:
    session, tenant_id, batch_id = rated_batch
    upsert_ratings(session=session, tenant_id=tenant_id, batch_id=batch_id,
                   ratings=[rating("r700", "bad", 1, corrected="x"), rating("r3", "good", 5)])
    session.commit()
    rated = ratings_with_results(session=session, tenant_id=tenant_id, batch_id=batch_id)
    assert [(r.custom_id, r.line_number, r.score, r.corrected, r.succeeded, r.output_line, r.input_key)
            for r in rated] == [
        ("r3", 3, 5, None, False, {"custom_id": "r3"}, f"batches/{batch_id}/shards/00000.jsonl"),
        ("r700", 700, 1, "x", True, {"custom_id": "r700"}, f"batches/{batch_id}/shards/00001.jsonl")]


def test_deleting_the_batch_deletes_its_ratings(rated_batch) -> None:
    session, tenant_id, batch_id = rated_batch
    upsert_ratings(session=session, tenant_id=tenant_id, batch_id=batch_id, ratings=[rating("r1", "good", 5)])
    session.commit()
    session.execute(delete(Batch).where(Batch.id == batch_id))
    session.commit()
    assert session.scalars(select(BatchFeedback).where(BatchFeedback.batch_id == batch_id)).all() == []
