"""db/batches and db/files on both databases genq runs on: PostgreSQL (deployed) and SQLite (embedded)."""

from __future__ import annotations

import io
import json
import uuid

import pytest
from sqlalchemy import delete

from db.batches import (
    NewShard,
    add_batch,
    add_shards,
    list_batches,
    request_cancel,
    request_counts,
    result_page,
    succeeded_custom_ids,
    usage_totals,
)
from db.files import create_file, delete_file, get_file, list_files, new_file_id
from db.leases import ResultRow, record_unfenced_results
from db.migrate import upgrade_to_head
from db.models import BatchStatus, RequestOutcome, ShardStatus, Tenant
from db.session import get_sessionmaker
from db.tenants import create_tenant


@pytest.fixture(params=["postgres", "sqlite"])
def db_session(request, tmp_path):
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'genq.db'}"
        upgrade_to_head(url)
    with get_sessionmaker(url)() as session:
        tenant = create_tenant(session=session, name=f"t-{uuid.uuid4().hex[:8]}")
        session.commit()
        yield session, tenant.id
        session.rollback()
        session.execute(delete(Tenant).where(Tenant.id == tenant.id))
        session.commit()


def new_batch(session, tenant_id: str, shard_sizes: list[int]):
    from db.batches import new_batch_id

    batch = add_batch(session=session, batch_id=new_batch_id(), tenant_id=tenant_id, input_file_id="file-x",
                      endpoint="/v1/chat/completions", completion_window="24h", model="m",
                      metadata=None, request_total=sum(shard_sizes), expires_in_seconds=86400)
    shards = add_shards(session=session, batch_id=batch.id, shards=[
        NewShard(index=i, model="m", queue="genq.m", input_key=f"k/{i}", request_count=n)
        for i, n in enumerate(shard_sizes)])
    session.commit()
    return batch, shards


def store_result(session, batch, shard, n: int, outcome: RequestOutcome) -> None:
    """Stores a result the way workers and the finalizer do (it also counts it on the shard)."""
    row = ResultRow(custom_id=f"c{n}", line_number=n, outcome=outcome, output_line={"custom_id": f"c{n}"},
                    prompt_tokens=10, completion_tokens=n)
    record_unfenced_results(session=session, batch_id=batch.id, shard_id=shard.id, attempt=1, worker_id=None,
                            results=[row])


def test_request_counts_follow_rows(db_session) -> None:
    session, tenant_id = db_session
    batch, shards = new_batch(session, tenant_id, [3, 3, 2])
    assert request_counts(session=session, batch=batch).as_dict() == {
        "total": 8, "completed": 0, "failed": 0, "in_progress": 0, "queued": 8}
    shards[0].status = ShardStatus.DONE
    shards[1].status = ShardStatus.RUNNING
    for shard, n, outcome in ((0, 1, RequestOutcome.SUCCEEDED), (0, 2, RequestOutcome.SUCCEEDED),
                              (0, 3, RequestOutcome.FAILED), (1, 4, RequestOutcome.SUCCEEDED),
                              (1, 4, RequestOutcome.SUCCEEDED)):  # the last, a second write of c4, is kept out
        store_result(session, batch, shards[shard], n, outcome)
    session.commit()
    counts = request_counts(session=session, batch=batch)
    assert counts.as_dict() == {"total": 8, "completed": 3, "failed": 1, "in_progress": 2, "queued": 2}
    assert usage_totals(session=session, batch=batch) == {
        "input_tokens": 40, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 10,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 50}
    batch.usage = {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
    assert usage_totals(session=session, batch=batch)["total_tokens"] == 3  # final usage wins
    assert [line["custom_id"] for _, line in result_page(session=session, batch_id=batch.id,
                                                        outcome=RequestOutcome.SUCCEEDED)] == ["c1", "c2", "c4"]
    first, *_ = result_page(session=session, batch_id=batch.id, outcome=RequestOutcome.SUCCEEDED, limit=1)
    assert len(result_page(session=session, batch_id=batch.id, outcome=RequestOutcome.SUCCEEDED,
                           after_id=first[0])) == 2
    assert succeeded_custom_ids(session=session, batch_id=batch.id) == {"c1", "c2", "c4"}


def test_cancel_is_conditional_and_idempotent(db_session) -> None:
    session, tenant_id = db_session
    batch, _ = new_batch(session, tenant_id, [1])
    assert request_cancel(session=session, tenant_id="someone-else", batch_id=batch.id) is None
    cancelling = request_cancel(session=session, tenant_id=tenant_id, batch_id=batch.id)
    assert cancelling.status == BatchStatus.CANCELLING and cancelling.cancelling_at
    first_at = cancelling.cancelling_at
    session.commit()
    assert request_cancel(session=session, tenant_id=tenant_id, batch_id=batch.id).cancelling_at == first_at
    done, _ = new_batch(session, tenant_id, [1])
    done.status = BatchStatus.COMPLETED
    session.commit()
    assert request_cancel(session=session, tenant_id=tenant_id, batch_id=done.id).status == BatchStatus.COMPLETED


def test_batch_and_file_pagination(db_session) -> None:
    session, tenant_id = db_session
    ids = [new_batch(session, tenant_id, [1])[0].id for _ in range(5)]
    page, more = list_batches(session=session, tenant_id=tenant_id, limit=2)
    assert [b.id for b in page] == ids[:-3:-1] and more
    page, more = list_batches(session=session, tenant_id=tenant_id, after=page[-1].id, limit=10)
    assert [b.id for b in page] == ids[2::-1] and not more
    assert list_batches(session=session, tenant_id="nobody")[0] == []
    files = [create_file(session=session, tenant_id=tenant_id, file_id=new_file_id(), filename="f", purpose="batch",
                         size=1).id for _ in range(3)]
    session.commit()
    assert [f.id for f in list_files(session=session, tenant_id=tenant_id, order="asc")[0]] == files
    deleted = delete_file(session=session, tenant_id=tenant_id, file_id=files[1])
    session.commit()
    assert deleted.id == files[1] and get_file(session=session, tenant_id=tenant_id, file_id=files[1]) is None
    # a cursor that was deleted mid-pagination still moves forward (ids sort by creation)
    assert [f.id for f in list_files(session=session, tenant_id=tenant_id, after=files[1])[0]] == [files[0]]


def test_create_batch_with_idempotency_on_both_databases(db_session, tmp_path) -> None:
    from api.batch_service import create_batch
    from genq.settings import Settings
    from storage.local import LocalStore

    session, tenant_id = db_session
    store = LocalStore(tmp_path / "store")
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}]}}
    file_id = new_file_id()
    store.put_stream(f"files/{file_id}", io.BytesIO(json.dumps(line).encode() + b"\n"))
    create_file(session=session, tenant_id=tenant_id, file_id=file_id, filename="in.jsonl", purpose="batch", size=1)
    settings = Settings(storage_url=str(tmp_path / "store"))
    kwargs = {"session": session, "store": store, "settings": settings, "tenant_id": tenant_id,
              "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "1h",
              "metadata": None, "idempotency_key": "k1", "fingerprint": "f1"}
    batch, shards = create_batch(**kwargs)
    session.commit()
    assert len(shards) == 1 and shards[0].status == ShardStatus.QUEUED
    again, no_shards = create_batch(**kwargs)
    assert again.id == batch.id and no_shards == []
