"""/v1/files through the official SDK, on a local directory and on SeaweedFS."""

from __future__ import annotations

import uuid

import openai
import pytest

from genq.settings import Settings
from tests.api.conftest import chat_line, jsonl


@pytest.fixture(params=["local", "s3"])
def settings(request, postgres_url, tmp_path, monkeypatch) -> Settings:
    if request.param == "local":
        return Settings(database_url=postgres_url, storage_url=str(tmp_path / "store"), max_file_bytes=64 * 1024)
    server = request.getfixturevalue("s3_server")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    return Settings(database_url=postgres_url, storage_url=f"s3://{server.bucket}/api-{uuid.uuid4().hex[:8]}",
                    s3_endpoint_url=server.endpoint_url, max_file_bytes=64 * 1024)


def test_upload_retrieve_content_delete(client: openai.OpenAI, app) -> None:
    data = jsonl([chat_line(f"r{i}") for i in range(20)])
    uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.object == "file" and uploaded.bytes == len(data)
    assert uploaded.filename == "requests.jsonl" and uploaded.purpose == "batch" and uploaded.status == "processed"
    assert client.files.retrieve(uploaded.id).model_dump() == uploaded.model_dump()
    assert client.files.content(uploaded.id).content == data
    assert app.state.store.get_bytes(f"files/{uploaded.id}") == data
    deleted = client.files.delete(uploaded.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (uploaded.id, "file", True)
    assert not app.state.store.exists(f"files/{uploaded.id}")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(uploaded.id)


def test_list_pages_and_filters(client: openai.OpenAI) -> None:
    ids = [client.files.create(file=(f"f{i}.jsonl", b"{}\n"), purpose="batch").id for i in range(3)]
    tuned = client.files.create(file=("ft.jsonl", b"{}\n"), purpose="fine-tune").id
    first = client.files.list(limit=2)
    assert [f.id for f in first.data] == [tuned, ids[2]] and first.has_more is True
    assert first.model_extra["first_id"] == tuned and first.model_extra["last_id"] == ids[2]
    assert [f.id for f in client.files.list(limit=2)] == [tuned, *ids[::-1]]  # the SDK follows `after`
    assert [f.id for f in client.files.list(purpose="batch", order="asc").data] == ids
    last = client.files.list(after=ids[0], order="desc")
    assert last.data == [] and last.has_more is False


def test_upload_too_large(client: openai.OpenAI, app) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("big.jsonl", b"x" * (64 * 1024 + 1)), purpose="batch")
    assert info.value.status_code == 413 and info.value.body["code"] == "file_too_large"
    with pytest.raises(openai.APIStatusError) as info:  # Content-Length alone already says too large
        client.files.create(file=("huge.jsonl", b"x" * (3 << 20)), purpose="batch")
    assert info.value.status_code == 413 and info.value.body["code"] == "file_too_large"
    assert client.files.list().data == []


def test_upload_bad_purpose_and_missing_file(client: openai.OpenAI, http, api_key) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="assistants")
    assert info.value.body["code"] == "invalid_value" and info.value.body["param"] == "purpose"
    response = http.post("/v1/files", data={"purpose": "batch"}, files={"other": (None, "x")},
                         headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "missing_required_parameter"
    response = http.post("/v1/files", json={"purpose": "batch"}, headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"
    assert client.files.list().data == []


def test_upload_expiry(client: openai.OpenAI) -> None:
    uploaded = client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch",
                                   expires_after={"anchor": "created_at", "seconds": 3600})
    assert uploaded.expires_at == uploaded.created_at + 3600
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 5})


def test_upload_expiry_that_is_not_an_ascii_number_is_400(client: openai.OpenAI, http, api_key) -> None:
    response = http.post("/v1/files", headers={"Authorization": f"Bearer {api_key}"},
                         data={"purpose": "batch", "expires_after[anchor]": "created_at",
                               "expires_after[seconds]": "3600\u00b3"}, files={"file": ("a.jsonl", b"{}\n")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "expires_after"
    assert client.files.list().data == []


def test_upload_that_cannot_be_recorded_leaves_no_bytes(client: openai.OpenAI, app, monkeypatch) -> None:
    from sqlalchemy.exc import OperationalError

    def database_down(**_kwargs):
        raise OperationalError("INSERT", {}, Exception("connection refused"))

    monkeypatch.setattr("api.files.new_file_id", lambda: "file-00000000000000000000dead")
    monkeypatch.setattr("api.files.create_file", database_down)
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
    assert info.value.status_code == 503
    assert not app.state.store.exists("files/file-00000000000000000000dead")
