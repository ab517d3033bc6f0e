"""The create path as plain functions (what `genq run` calls), without HTTP."""

from __future__ import annotations

import io
import json

import pytest

from api.batch_input import BatchInputInvalid
from api.batch_service import completion_window_seconds, create_batch
from api.errors import InvalidRequest, NotFound
from db.batches import list_shards
from db.files import create_file, file_storage_key, new_file_id
from db.models import BatchStatus, ShardStatus
from tests.api.conftest import SECOND_MODEL, chat_line, jsonl
from workers.registry import BUNDLED_MODEL_ID


def upload(session, store, tenant_id: str, lines: list) -> str:
    data = jsonl(lines)
    file_id = new_file_id()
    store.put_stream(file_storage_key(file_id), io.BytesIO(data))
    create_file(session=session, tenant_id=tenant_id, file_id=file_id, filename="in.jsonl", purpose="batch",
                size=len(data))
    return file_id


def test_create_splits_shards_per_model(session, store, settings, tenant) -> None:
    lines = [chat_line(f"a{i}") for i in range(3)] + [chat_line(f"b{i}", SECOND_MODEL) for i in range(2)]
    file_id = upload(session, store, tenant.id, lines)
    batch, shards = create_batch(session=session, store=store, settings=settings, tenant_id=tenant.id,
                                 input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="2h")
    session.commit()
    assert batch.status == BatchStatus.IN_PROGRESS and batch.request_total == 5
    assert batch.expires_at == batch.created_at + 7200 and batch.in_progress_at == batch.created_at
    assert batch.model == f"{BUNDLED_MODEL_ID},{SECOND_MODEL}"
    assert [(s.index, s.model, s.request_count) for s in shards] == [
        (0, BUNDLED_MODEL_ID, 2), (1, BUNDLED_MODEL_ID, 1), (2, SECOND_MODEL, 2)]
    assert all(s.status == ShardStatus.QUEUED and s.queue == f"genq.{s.model}" for s in shards)
    assert [s.id for s in list_shards(session=session, batch_id=batch.id)] == [s.id for s in shards]
    first = [json.loads(x) for x in store.get_bytes(f"batches/{batch.id}/shards/00000.jsonl").splitlines()]
    assert [(x["line"], x["custom_id"]) for x in first] == [(1, "a0"), (2, "a1")]
    assert first[0]["body"] == lines[0]["body"]
    assert [json.loads(x)["line"] for x in store.get_bytes(shards[2].input_key).splitlines()] == [4, 5]


def test_invalid_file_writes_nothing(session, store, settings, tenant) -> None:
    file_id = upload(session, store, tenant.id, [chat_line("a"), chat_line("b"), b"{not json", chat_line("a")])
    with pytest.raises(BatchInputInvalid) as info:
        create_batch(session=session, store=store, settings=settings, tenant_id=tenant.id, input_file_id=file_id,
                     endpoint="/v1/chat/completions")
    assert info.value.code == "invalid_json_line" and info.value.extra["line"] == 3
    assert [(e.code, e.line) for e in info.value.errors] == [("invalid_json_line", 3), ("duplicate_custom_id", 4)]
    assert not (store.root / "batches").exists()


def test_unknown_file_and_bad_window(session, store, settings, tenant) -> None:
    with pytest.raises(NotFound):
        create_batch(session=session, store=store, settings=settings, tenant_id=tenant.id,
                     input_file_id="file-missing", endpoint="/v1/chat/completions")
    for window in ("0h", "24", "1w", "400d"):
        with pytest.raises(InvalidRequest):
            completion_window_seconds(window)
    assert completion_window_seconds("7d") == 7 * 86400


def test_overlong_line_stops_validation(session, store, settings, tenant, monkeypatch) -> None:
    monkeypatch.setattr("api.batch_input.MAX_LINE_BYTES", 1000)
    file_id = upload(session, store, tenant.id, [chat_line("a"), b"[" + b"1," * 800 + b"1]"])
    with pytest.raises(BatchInputInvalid) as info:
        create_batch(session=session, store=store, settings=settings, tenant_id=tenant.id, input_file_id=file_id,
                     endpoint="/v1/chat/completions")
    assert (info.value.code, info.value.extra["line"]) == ("line_too_long", 2)


def test_idempotency_race_returns_the_twin_and_removes_its_own_shards(session, store, settings, tenant,
                                                                      monkeypatch) -> None:
    from api import batch_service

    file_id = upload(session, store, tenant.id, [chat_line("a"), chat_line("b")])
    create = {"session": session, "store": store, "settings": settings, "tenant_id": tenant.id,
              "input_file_id": file_id, "endpoint": "/v1/chat/completions", "idempotency_key": "k1",
              "fingerprint": "f1"}
    twin, _ = create_batch(**create)
    session.commit()
    real_lookup, lookups = batch_service.get_batch_by_idempotency_key, []

    def first_lookup_misses(**kwargs):  # as if the twin committed just after our pre-check
        lookups.append(kwargs)
        return None if len(lookups) == 1 else real_lookup(**kwargs)

    monkeypatch.setattr(batch_service, "get_batch_by_idempotency_key", first_lookup_misses)
    batch, shards = create_batch(**create)
    assert batch.id == twin.id and shards == [] and len(lookups) == 2
    stored = sorted(path.relative_to(store.root / "batches").parts[0]
                    for path in (store.root / "batches").rglob("*.jsonl"))
    assert stored == [twin.id]


def test_validation_reads_the_model_list_once_per_file(session, store, settings, tenant, monkeypatch) -> None:
    from workers import registry

    reads = []
    real_list_models = registry.list_models
    monkeypatch.setattr(registry, "list_models", lambda s: reads.append(s) or real_list_models(s))
    file_id = upload(session, store, tenant.id, [chat_line(f"r{i}", SECOND_MODEL) for i in range(5)])
    batch, _ = create_batch(session=session, store=store, settings=settings, tenant_id=tenant.id,
                            input_file_id=file_id, endpoint="/v1/chat/completions")
    assert batch.request_total == 5 and len(reads) == 1
