"""Both Store backends against the same behaviour: a tmp directory and the SeaweedFS S3 server."""

from __future__ import annotations

import io
import uuid

import pytest

from genq.settings import Settings
from storage import StorageKeyNotFound, Store, store_from_settings
from storage.local import LocalStore
from storage.s3 import S3Store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    settings = Settings(storage_url=f"s3://{server.bucket}/t-{uuid.uuid4().hex[:8]}",
                        s3_endpoint_url=server.endpoint_url)
    return store_from_settings(settings)


class OneShotStream(io.RawIOBase):
    """A non-seekable stream that fails if asked for more than 64 KiB at once (no whole reads)."""

    def __init__(self, total: int) -> None:
        self.left = total

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        assert 0 < size <= 16 << 20, f"read({size}) would load the whole stream"
        n = min(size, self.left)
        self.left -= n
        return b"x" * n


def test_round_trip(store: Store) -> None:
    assert isinstance(store, Store)
    data = b"".join(b'{"line": %d}\n' % i for i in range(5000))
    assert store.put_stream("files/a.jsonl", io.BytesIO(data)) == len(data)
    assert store.exists("files/a.jsonl")
    assert store.size("files/a.jsonl") == len(data)
    assert store.get_bytes("files/a.jsonl") == data
    assert b"".join(store.iter_chunks("files/a.jsonl", chunk_size=1000)) == data
    assert all(len(c) <= 1000 for c in store.iter_chunks("files/a.jsonl", chunk_size=1000))
    with store.open_stream("files/a.jsonl") as stream:
        lines = list(stream)
    assert lines[0] == b'{"line": 0}\n' and lines[-1] == b'{"line": 4999}\n' and len(lines) == 5000


def test_put_bytes_replaces(store: Store) -> None:
    store.put_bytes("batches/b/shards/00000.jsonl", b"one")
    store.put_bytes("batches/b/shards/00000.jsonl", b"two")
    assert store.get_bytes("batches/b/shards/00000.jsonl") == b"two"


def test_missing_key(store: Store) -> None:
    assert not store.exists("nope/missing")
    for op in (store.get_bytes, store.size, store.open_stream, store.iter_chunks):
        with pytest.raises(StorageKeyNotFound) as info:
            op("nope/missing")
        assert "nope/missing" in str(info.value)


def test_delete_is_idempotent(store: Store) -> None:
    store.put_bytes("d/x", b"1")
    store.delete("d/x")
    store.delete("d/x")
    assert not store.exists("d/x")


def test_put_stream_large_non_seekable(store: Store) -> None:
    total = 20 << 20  # above the 8 MiB multipart threshold
    assert store.put_stream("big/blob", OneShotStream(total)) == total
    assert store.size("big/blob") == total


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b"])
def test_rejects_escaping_keys(tmp_path, key: str) -> None:
    with pytest.raises(ValueError):
        LocalStore(tmp_path).put_bytes(key, b"")


def test_store_from_settings(tmp_path) -> None:
    local = store_from_settings(Settings(storage_url=str(tmp_path / "s")))
    assert isinstance(local, LocalStore) and local.root == tmp_path / "s"
    s3 = store_from_settings(Settings(storage_url="s3://bkt/some/prefix", s3_endpoint_url="http://127.0.0.1:1"))
    assert isinstance(s3, S3Store) and s3.bucket == "bkt" and s3.prefix == "some/prefix"


def test_list_keys_under_a_prefix(store: Store) -> None:
    for key in ("batches/batch_a/shards/00000.jsonl", "batches/batch_a/output.jsonl", "batches/batch_b/x.jsonl",
                "files/file-1"):
        store.put_bytes(key, b"x")
    assert sorted(store.list_keys("batches/batch_a/")) == ["batches/batch_a/output.jsonl",
                                                          "batches/batch_a/shards/00000.jsonl"]
    assert list(store.list_keys("batches/batch_none/")) == []
