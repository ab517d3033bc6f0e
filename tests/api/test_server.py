"""A real uvicorn server on a free port and real HTTP: chunked streaming upload to S3, and the size cap."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn

from genq.settings import Settings
from tests.api.conftest import chat_line, jsonl
from tests.services import free_port


@dataclass
class RunningServer:
    url: str  # base_url for the SDK, ending in /v1
    prefix: str  # the S3 prefix this server's store writes under


@pytest.fixture
def server(postgres_url, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    from api.main import create_app

    prefix = f"srv-{uuid.uuid4().hex[:6]}"
    settings = Settings(database_url=postgres_url, storage_url=f"s3://{s3_server.bucket}/{prefix}",
                        s3_endpoint_url=s3_server.endpoint_url, max_file_bytes=12 << 20, shard_size=1000)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield RunningServer(url=f"http://127.0.0.1:{port}/v1", prefix=prefix)
    uv.should_exit = True
    thread.join(timeout=10)


def stored_files(s3_server, prefix: str) -> list[str]:
    listing = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{prefix}/files/")
    return [item["Key"] for item in listing.get("Contents", [])]


def test_large_upload_streams_to_s3_and_batches(server: RunningServer, api_key: str) -> None:
    client = openai.OpenAI(base_url=server.url, api_key=api_key, max_retries=0)
    data = jsonl([chat_line(f"r{i}", user="x" * 9000) for i in range(1100)])  # ~10 MB: S3 multipart
    assert 8 << 20 < len(data) < 12 << 20
    uploaded = client.files.create(file=("big.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data)
    assert client.files.content(uploaded.id).content == data
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert batch.request_counts.total == 1100


def test_chunked_upload_is_cut_at_the_cap(server: RunningServer, api_key: str, s3_server) -> None:
    """Without Content-Length the cap is enforced while streaming, and the partial object is removed."""
    boundary = "genqtestboundary"

    def body():
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
               f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        for _ in range(20):  # 20 MiB against a 12 MiB cap
            yield b"z" * (1 << 20)
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": f"multipart/form-data; boundary={boundary}"}
    response = httpx.post(f"{server.url}/files", content=body(), headers=headers, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
    assert openai.OpenAI(base_url=server.url, api_key=api_key).files.list().data == []
    assert stored_files(s3_server, server.prefix) == []
