"""Batch lifecycle through the SDK: create, retrieve, list, cancel, idempotency, live counts, extensions."""

from __future__ import annotations

import base64
import json

import openai
import pytest
from sqlalchemy import select, update

from db.leases import ResultRow, record_unfenced_results
from db.models import Batch, BatchStatus, RequestOutcome, RequestResult, Shard, ShardStatus
from tests.api.conftest import SECOND_MODEL, chat_line, jsonl
from workers.registry import BUNDLED_MODEL_ID

CHAT = "/v1/chat/completions"


def make_batch(client: openai.OpenAI, n: int = 5, **kwargs) -> openai.types.Batch:
    lines = [chat_line(f"r{i}", model=SECOND_MODEL if i % 2 else None) for i in range(n)]
    file_id = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch").id
    return client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h", **kwargs)


def add_result(app, session, batch_id: str, custom_id: str, outcome: RequestOutcome, tokens=(3, 4)) -> None:
    """What a worker records for one request, in the shard whose stored lines hold custom_id."""
    for shard in session.scalars(select(Shard).where(Shard.job_id == batch_id)):
        lines = [json.loads(x) for x in app.state.store.get_bytes(shard.input_key).splitlines()]
        line_number = next((x["line"] for x in lines if x["custom_id"] == custom_id), None)
        if line_number is not None:
            break
    response = {"status_code": 200, "request_id": f"req_{custom_id}", "body": {"choices": []}}
    output = {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "response": response, "error": None}
    if outcome == RequestOutcome.FAILED:
        output |= {"response": None, "error": {"code": "batch_expired", "message": "expired"}}
    row = ResultRow(custom_id=custom_id, line_number=line_number, outcome=outcome, output_line=output,
                    prompt_tokens=tokens[0], completion_tokens=tokens[1])
    record_unfenced_results(session=session, batch_id=batch_id, shard_id=shard.id, attempt=1, worker_id="w1",
                            results=[row])
    session.commit()


def test_create_and_retrieve(client: openai.OpenAI, session) -> None:
    batch = make_batch(client, metadata={"job": "catalog"})
    assert batch.id.startswith("batch_") and batch.object == "batch" and batch.endpoint == CHAT
    assert batch.status == "in_progress" and batch.completion_window == "24h"
    assert batch.in_progress_at == batch.created_at and batch.expires_at == batch.created_at + 86400
    assert batch.metadata == {"job": "catalog"} and batch.model == f"{BUNDLED_MODEL_ID},{SECOND_MODEL}"
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (5, 0, 0)
    assert counts.model_extra == {"in_progress": 0, "queued": 5}
    assert batch.output_file_id is None and batch.errors is None
    assert client.batches.retrieve(batch.id).model_dump() == batch.model_dump()
    shards = session.scalars(select(Shard).where(Shard.job_id == batch.id).order_by(Shard.index)).all()
    assert [(s.model, s.request_count, s.queue) for s in shards] == [
        (BUNDLED_MODEL_ID, 2, f"genq.{BUNDLED_MODEL_ID}"), (SECOND_MODEL, 2, f"genq.{SECOND_MODEL}"),
        (BUNDLED_MODEL_ID, 1, f"genq.{BUNDLED_MODEL_ID}")]


def test_custom_completion_window(client: openai.OpenAI) -> None:
    file_id = client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="7d")  # type: ignore[arg-type]
    assert batch.completion_window == "7d" and batch.expires_at == batch.created_at + 7 * 86400


def test_list_pagination(client: openai.OpenAI) -> None:
    ids = [make_batch(client, n=1).id for _ in range(3)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == [ids[2], ids[1]] and page.has_more is True
    assert page.model_extra["first_id"] == ids[2] and page.model_extra["last_id"] == ids[1]
    rest = client.batches.list(limit=2, after=ids[1])
    assert [b.id for b in rest.data] == [ids[0]] and rest.has_more is False
    assert [b.id for b in client.batches.list(limit=1)] == ids[::-1]  # auto-pagination stops on has_more
    with pytest.raises(openai.BadRequestError):
        client.batches.list(limit=101)


def test_cancel(client: openai.OpenAI, session) -> None:
    batch = make_batch(client, n=2)
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling" and cancelled.cancelling_at is not None
    assert client.batches.cancel(batch.id).cancelling_at == cancelled.cancelling_at  # idempotent
    session.execute(update(Batch).where(Batch.id == batch.id).values(status=BatchStatus.CANCELLED))
    session.commit()
    assert client.batches.cancel(batch.id).status == "cancelled"
    done = make_batch(client, n=1)
    session.execute(update(Batch).where(Batch.id == done.id).values(status=BatchStatus.COMPLETED))
    session.commit()
    with pytest.raises(openai.ConflictError) as info:
        client.batches.cancel(done.id)
    assert info.value.body["code"] == "batch_not_cancellable"
    assert info.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")


def test_idempotency_key(client: openai.OpenAI) -> None:
    file_id = client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch").id
    params = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
    first = client.batches.create(**params, extra_headers={"Idempotency-Key": "job-42"})
    again = client.batches.create(**params, extra_headers={"Idempotency-Key": "job-42"})
    assert again.id == first.id and len(client.batches.list().data) == 1
    with pytest.raises(openai.ConflictError) as info:
        client.batches.create(**params, metadata={"x": "y"}, extra_headers={"Idempotency-Key": "job-42"})
    assert info.value.body["code"] == "idempotency_key_reused"
    assert client.batches.create(**params).id != first.id  # no key: a new batch


def test_live_request_counts_and_usage(client: openai.OpenAI, app, session) -> None:
    batch = make_batch(client, n=5)
    first_shard = session.scalars(select(Shard).where(Shard.job_id == batch.id, Shard.index == 0)).one()
    first_shard.status = ShardStatus.RUNNING
    session.commit()
    add_result(app, session, batch.id, "r0", RequestOutcome.SUCCEEDED)  # shard 0 (running) holds r0 and r2
    add_result(app, session, batch.id, "r1", RequestOutcome.FAILED, tokens=(2, 0))  # shard 1 (queued)
    live = client.batches.retrieve(batch.id)
    counts = live.request_counts
    assert (counts.total, counts.completed, counts.failed) == (5, 1, 1)
    assert counts.model_extra == {"in_progress": 1, "queued": 2}
    assert live.usage.input_tokens == 5 and live.usage.output_tokens == 4 and live.usage.total_tokens == 9


def test_partial_results(client: openai.OpenAI, app, session, http, api_key) -> None:
    batch = make_batch(client, n=4)
    add_result(app, session, batch.id, "r0", RequestOutcome.SUCCEEDED)
    add_result(app, session, batch.id, "r3", RequestOutcome.SUCCEEDED)
    add_result(app, session, batch.id, "r1", RequestOutcome.FAILED)
    auth = {"Authorization": f"Bearer {api_key}"}
    ok = http.get(f"/v1/batches/{batch.id}/partial", headers=auth)
    assert ok.status_code == 200
    assert [json.loads(x)["custom_id"] for x in ok.text.splitlines()] == ["r0", "r3"]
    failed = http.get(f"/v1/batches/{batch.id}/partial", params={"errors": "true"}, headers=auth)
    assert [json.loads(x)["error"]["code"] for x in failed.text.splitlines()] == ["batch_expired"]
    assert http.get("/v1/batches/batch_nope/partial", headers=auth).status_code == 404


def test_retry_failed(client: openai.OpenAI, app, session) -> None:
    batch = make_batch(client, n=5)
    with pytest.raises(openai.ConflictError):  # still running
        client.post(f"/batches/{batch.id}/retry_failed", cast_to=openai.types.Batch)
    for custom_id in ("r0", "r2"):
        add_result(app, session, batch.id, custom_id, RequestOutcome.SUCCEEDED)
    add_result(app, session, batch.id, "r1", RequestOutcome.FAILED)  # r3, r4 never ran (expired)
    session.execute(update(Batch).where(Batch.id == batch.id).values(status=BatchStatus.EXPIRED))
    session.commit()
    retry = client.post(f"/batches/{batch.id}/retry_failed", cast_to=openai.types.Batch)
    assert retry.id != batch.id and retry.model_extra["retried_from"] == batch.id
    assert retry.status == "in_progress" and retry.request_counts.total == 3
    lines = [json.loads(x) for x in client.files.content(retry.input_file_id).content.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["r1", "r3", "r4"]
    assert all(x["method"] == "POST" and x["url"] == CHAT and x["body"]["messages"] for x in lines)
    original = client.files.retrieve(retry.input_file_id)
    assert original.purpose == "batch" and original.filename == f"{batch.id}_retry.jsonl"
    for custom_id in ("r3", "r4"):  # everything succeeds now: nothing left to retry
        add_result(app, session, batch.id, custom_id, RequestOutcome.SUCCEEDED)
    session.execute(update(RequestResult).where(RequestResult.batch_id == batch.id)
                    .values(outcome=RequestOutcome.SUCCEEDED))
    session.commit()
    with pytest.raises(openai.BadRequestError) as info:
        client.post(f"/batches/{batch.id}/retry_failed", cast_to=openai.types.Batch)
    assert info.value.body["code"] == "nothing_to_retry"


def test_create_enqueues_shards_when_a_broker_is_set(settings, session, api_key, redis_url) -> None:
    import redis
    from fastapi.testclient import TestClient

    from api.main import create_app

    app = create_app(settings.model_copy(update={"broker_url": redis_url}))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=api_key, http_client=TestClient(app),
                           max_retries=0)
    broker = redis.Redis.from_url(redis_url)
    queues = [f"genq.{BUNDLED_MODEL_ID}", f"genq.{SECOND_MODEL}"]
    broker.delete(*queues)
    try:
        batch = make_batch(client, n=5)  # shards: 2 for the bundled model, 1 for the second
        assert [broker.llen(q) for q in queues] == [2, 1]
        shard_ids = {s.id for s in session.scalars(select(Shard).where(Shard.job_id == batch.id))}
        sent = [json.loads(m) for q in queues for m in broker.lrange(q, 0, -1)]
        assert {m["headers"]["task"] for m in sent} == {"genq.run_shard"}
        assert {json.loads(base64.b64decode(m["body"]))[0][0] for m in sent} == shard_ids
    finally:
        broker.delete(*queues)


def test_unknown_batch_is_the_same_404_on_every_route(client: openai.OpenAI) -> None:
    calls = (lambda: client.batches.retrieve("batch_nope"), lambda: client.batches.cancel("batch_nope"),
             lambda: client.post("/batches/batch_nope/retry_failed", cast_to=openai.types.Batch))
    for call in calls:
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.body["param"] == "batch_id" and info.value.body["message"] == "No such batch: batch_nope"
