"""Per-key rate limits and per-tenant queue caps: 429, retry-after, and a message with the numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from db.tenants import create_api_key
from tests.api.conftest import chat_line, jsonl

CHAT = "/v1/chat/completions"


def make_client(settings, **changes) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=changes)), raise_server_exceptions=False)


def submit(http, auth, lines) -> object:
    file_id = http.post("/v1/files", headers=auth, files={"file": ("in.jsonl", jsonl(lines))},
                        data={"purpose": "batch"}).json()["id"]
    return http.post("/v1/batches", headers=auth, json={"input_file_id": file_id, "endpoint": CHAT,
                                                       "completion_window": "24h"})


def test_requests_per_minute_per_key(settings, session, tenant, api_key) -> None:
    http = make_client(settings, rate_limit_requests_per_minute=5)
    auth = {"Authorization": f"Bearer {api_key}"}
    answers = [http.get("/v1/batches", headers=auth) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 5 + [429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:5]] == ["4", "3", "2", "1", "0"]
    refused = answers[-1]
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "5 requests per minute" in error["message"] and int(refused.headers["retry-after"]) <= 61
    _, other_key = create_api_key(session=session, tenant_id=tenant.id)  # the limit is the key's
    session.commit()
    assert http.get("/v1/batches", headers={"Authorization": f"Bearer {other_key}"}).status_code == 200


def test_rate_is_shared_by_api_processes_through_redis(settings, api_key, redis_url) -> None:
    first, second = (make_client(settings, rate_limit_requests_per_minute=4, broker_url=redis_url) for _ in "ab")
    auth = {"Authorization": f"Bearer {api_key}"}
    codes = [client.get("/v1/models", headers=auth).status_code for client in (first, second) * 3]
    assert codes == [200, 200, 200, 200, 429, 429]


def stored_shards(settings) -> set[str]:
    root = Path(settings.storage_url)
    return {str(p.relative_to(root)) for p in root.glob("batches/*/shards/*")}


def test_queued_requests_cap(settings, api_key) -> None:
    http = make_client(settings, max_queued_requests_per_tenant=3)
    auth = {"Authorization": f"Bearer {api_key}"}
    assert submit(http, auth, [chat_line("a"), chat_line("b")]).status_code == 200
    before = stored_shards(settings)
    assert len(before) == 1
    refused = submit(http, auth, [chat_line("c"), chat_line("d")])
    assert refused.status_code == 429 and refused.headers["x-should-retry"] == "false"
    assert refused.headers["retry-after"] == "60"
    error = refused.json()["error"]
    assert error["code"] == "queued_requests_limit_exceeded" and error["type"] == "requests"
    assert "adds 2 requests to the 2" in error["message"] and "cap of 3" in error["message"]
    assert stored_shards(settings) == before  # the refused batch's shards were removed
    assert len(http.get("/v1/batches", headers=auth).json()["data"]) == 1
    limits = http.get("/v1/genq/limits", headers=auth).json()
    assert limits["queued_requests"] == {"limit": 3, "used": 2, "scope": "tenant"}
    assert submit(http, auth, [chat_line("e")]).status_code == 200  # exactly at the cap is allowed


@pytest.mark.parametrize("max_tokens", [80])
def test_queued_tokens_cap(settings, api_key, max_tokens) -> None:
    http = make_client(settings, max_queued_tokens_per_tenant=100)
    auth = {"Authorization": f"Bearer {api_key}"}
    assert submit(http, auth, [chat_line("a", max_tokens=max_tokens)]).status_code == 200
    refused = submit(http, auth, [chat_line("b", max_tokens=30)])
    error = refused.json()["error"]
    assert refused.status_code == 429 and error["code"] == "queued_tokens_limit_exceeded"
    assert "adds 30 tokens to the 80" in error["message"]
    limits = http.get("/v1/genq/limits", headers=auth).json()
    assert limits["queued_tokens"]["used"] == 80 and limits["requests_per_minute"]["scope"] == "api_key"
