"""API keys, /v1/models, /health, and the OpenAI error body for anything that goes wrong."""

from __future__ import annotations

import time

import openai
import pytest

from db.session import get_sessionmaker
from db.tenants import revoke_api_key, tenant_for_key
from genq.settings import Settings
from tests.api.conftest import SECOND_MODEL
from workers.registry import BUNDLED_MODEL_ID


@pytest.mark.parametrize("header", [None, "Bearer ", "Bearer sk-genq-wrong", "Basic abc"])
def test_missing_or_wrong_key_is_401(http, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    for method, path in (("GET", "/v1/files"), ("GET", "/v1/batches"), ("POST", "/v1/files"),
                         ("GET", "/v1/models"), ("POST", "/v1/batches")):
        response = http.request(method, path, headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_revoked_key_is_401_once_the_key_cache_forgets_it(client: openai.OpenAI, app, session, api_key) -> None:
    app.state.key_cache.seconds = 0.3
    client.files.list()
    assert revoke_api_key(session=session, key=api_key[:16]) == 1
    session.commit()
    time.sleep(0.4)
    with pytest.raises(openai.AuthenticationError) as info:
        client.files.list()
    assert info.value.body["code"] == "invalid_api_key"


def test_models(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {BUNDLED_MODEL_ID, SECOND_MODEL, "gan", "vae"}
    assert models[SECOND_MODEL].object == "model" and models[SECOND_MODEL].owned_by == "genq"
    assert models[SECOND_MODEL].model_extra["context_length"] == 512
    assert models[SECOND_MODEL].model_extra["modality"] == "text"
    assert {models[name].model_extra["modality"] for name in ("gan", "vae")} == {"image"}  # the architectures
    assert client.models.retrieve(BUNDLED_MODEL_ID).id == BUNDLED_MODEL_ID
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-17")
    assert info.value.body["code"] == "model_not_found"


def test_health(http) -> None:
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "storage": "ok", "broker": "disabled"}}


def test_health_degraded(postgres_url, tmp_path, redis_url) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.services import free_port

    up = Settings(database_url=postgres_url, storage_url=str(tmp_path), broker_url=redis_url)
    assert TestClient(create_app(up)).get("/health").json()["checks"]["broker"] == "ok"
    down = up.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    response = TestClient(create_app(down)).get("/health")
    assert response.status_code == 503 and response.json()["status"] == "degraded"
    assert response.json()["checks"]["broker"].startswith("error")


def test_unknown_route_and_method(http) -> None:
    response = http.get("/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = http.put("/v1/files")
    assert response.status_code == 405 and "error" in response.json()


def test_unexpected_error_is_an_openai_500(client: openai.OpenAI, monkeypatch) -> None:
    def boom(**_kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr("api.files.list_files", boom)
    with pytest.raises(openai.InternalServerError) as info:
        client.files.list()
    assert info.value.status_code == 500 and info.value.body["type"] == "server_error"
    assert "secret internal detail" not in info.value.response.text and "Traceback" not in info.value.response.text


def test_bootstrap_key(postgres_url, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app

    secret = f"sk-genq-boot-{tmp_path.name}"
    app = create_app(Settings(database_url=postgres_url, storage_url=str(tmp_path), bootstrap_api_key=secret))
    with TestClient(app) as http:
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    with get_sessionmaker(postgres_url)() as session:
        session.delete(tenant_for_key(session=session, secret=secret))
        session.commit()


def test_openapi(http) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/files", "/v1/batches", "/v1/batches/{batch_id}/cancel", "/v1/models", "/health"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/files"]["post"]["requestBody"]["content"]
