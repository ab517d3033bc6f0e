"""Fixtures for the API tests: PostgreSQL session, a local or S3 store, a tenant with a key."""

from __future__ import annotations

import json

import pytest

from db.tenants import create_api_key
from genq.settings import Settings
from storage.local import LocalStore

SECOND_MODEL = "tiny-test-model"  # registered through a models file, context length 512


@pytest.fixture
def settings(postgres_url, tmp_path) -> Settings:
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps({SECOND_MODEL: {"source": "/nonexistent", "context_length": 512}}))
    return Settings(database_url=postgres_url, storage_url=str(tmp_path / "store"), broker_url="",
                    models_file=models_file, shard_size=2, max_batch_requests=50, max_file_bytes=64 * 1024)


@pytest.fixture
def store(settings) -> LocalStore:
    return LocalStore(settings.storage_url)


@pytest.fixture
def api_key(session, tenant) -> str:
    _, secret = create_api_key(session=session, tenant_id=tenant.id)
    session.commit()
    return secret


@pytest.fixture
def app(settings):
    from api.main import create_app

    return create_app(settings)


@pytest.fixture
def http(app):
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def client(http, api_key):
    """The official SDK, talking to the app in-process; no retries so each call is one request."""
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key=api_key, http_client=http, max_retries=0)


def jsonl(lines: list) -> bytes:
    """JSONL bytes of dicts (dumped) and bytes (kept as they are)."""
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def sft_lines(count: int, sign_off: str = "Made to last.") -> list[dict]:
    """count distinct chat examples in OpenAI's fine-tuning format."""
    return [{"messages": [{"role": "user", "content": f"Describe product {i}."},
                          {"role": "assistant", "content": f"Product {i} is sturdy. {sign_off}"}]}
            for i in range(count)]


def chat_line(custom_id: str, model: str | None = None, **body) -> dict:
    from workers.registry import BUNDLED_MODEL_ID

    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model or BUNDLED_MODEL_ID, "messages": [{"role": "user", "content": custom_id}],
                     **body}}
