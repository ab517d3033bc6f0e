"""Fixtures for the worker tests: a database (PostgreSQL and SQLite), a local store, batches made
through the real create path, and a fake model."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from sqlalchemy import delete

from api.batch_service import create_batch
from db.files import create_file, file_storage_key, new_file_id
from db.migrate import upgrade_to_head
from db.models import Tenant
from db.session import get_engine, session_scope
from db.tenants import create_tenant
from genq.settings import Settings
from storage import store_from_settings
from tests.workers.fake_model import FakeModel

FAKE_MODEL = "fake-model"


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request, tmp_path_factory) -> str:
    if request.param == "postgresql":
        yield request.getfixturevalue("postgres_url")
        return
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'genq.db'}"
    upgrade_to_head(url)
    yield url
    get_engine(url).dispose()


@pytest.fixture
def settings(db_url, tmp_path) -> Settings:
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps({FAKE_MODEL: {"source": "/nonexistent", "context_length": 256}}))
    return Settings(database_url=db_url, storage_url=str(tmp_path / "store"), broker_url="", models_file=models_file,
                    shard_size=4, lease_seconds=5, heartbeat_seconds=0.05, max_attempts=3, max_batch_size=2,
                    default_max_tokens=8, reaper_interval_seconds=0.1, home=tmp_path / "home")


@pytest.fixture
def tenant_id(settings):
    with session_scope(settings.database_url) as session:
        tenant = create_tenant(session=session, name=f"t-{uuid.uuid4().hex[:8]}")
        tenant_id = tenant.id
    yield tenant_id
    with session_scope(settings.database_url) as session:
        session.execute(delete(Tenant).where(Tenant.id == tenant_id))


def chat_line(custom_id: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": FAKE_MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
                     "max_tokens": 4, **body}}


@dataclass
class MadeBatch:
    batch_id: str
    shard_ids: list[int]


@pytest.fixture
def make_batch(settings, tenant_id) -> Callable[..., MadeBatch]:
    """Uploads lines as a batch input file and creates the batch with api.batch_service.create_batch."""

    def make(lines: list[dict], endpoint: str = "/v1/chat/completions") -> MadeBatch:
        store = store_from_settings(settings)
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        with session_scope(settings.database_url) as session:
            file_id = new_file_id()
            store.put_stream(file_storage_key(file_id), io.BytesIO(data))
            create_file(session=session, tenant_id=tenant_id, file_id=file_id, filename="in.jsonl",
                        purpose="batch", size=len(data))
            batch, shards = create_batch(session=session, store=store, settings=settings, tenant_id=tenant_id,
                                         input_file_id=file_id, endpoint=endpoint)
            return MadeBatch(batch.id, [s.id for s in shards])

    return make


@pytest.fixture
def fake_model() -> FakeModel:
    return FakeModel()
