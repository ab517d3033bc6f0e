"""Object storage for file bytes, shard inputs and results: a local directory or an S3 bucket.

`store_from_settings(settings)` picks the backend from settings.storage_url ("s3://BUCKET/PREFIX" or a
path). Every backend implements `Store`; a missing key raises `StorageKeyNotFound`. Imports only
the standard library, boto3 and tenacity: no database, no HTTP framework, no torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

from storage.errors import StorageError, StorageKeyNotFound

if TYPE_CHECKING:
    from genq.settings import Settings

__all__ = ["Store", "StorageError", "StorageKeyNotFound", "store_from_settings"]


@runtime_checkable
class Store(Protocol):
    """Bytes under string keys such as "files/file-abc.jsonl" or "batches/batch_x/shards/00000.jsonl"."""

    def put_stream(self, key: str, fileobj: BinaryIO) -> int:
        """Writes fileobj to key chunk by chunk (never whole in memory); returns the bytes written."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None:
        """Writes data to key, replacing what was there."""
        ...

    def open_stream(self, key: str) -> BinaryIO:
        """A readable binary stream of key; iterating it yields lines. The caller closes it."""
        ...

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The bytes of key in chunks of at most chunk_size; raises StorageKeyNotFound before the first.

        Shared by the backends (they subclass Store): open_stream is all it needs.
        """
        stream = self.open_stream(key)  # opened now, so a missing key raises here, not on first next()

        def chunks() -> Iterator[bytes]:
            with stream:
                while chunk := stream.read(chunk_size):
                    yield chunk

        return chunks()

    def get_bytes(self, key: str) -> bytes:
        """The whole content of key (for small objects)."""
        ...

    def delete(self, key: str) -> None:
        """Removes key; deleting a missing key is not an error."""
        ...

    def exists(self, key: str) -> bool:
        """Whether key holds an object."""
        ...

    def size(self, key: str) -> int:
        """The length of key's object in bytes."""
        ...

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key that starts with prefix (a directory-like prefix ending in "/"), in no set order."""
        ...


def store_from_settings(settings: Settings) -> Store:
    """The Store that settings.storage_url names: S3Store for "s3://BUCKET/PREFIX", else LocalStore."""
    url = settings.resolved_storage_url()
    if url.startswith("s3://"):
        from storage.s3 import S3Store

        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"storage_url {url!r} names no bucket")
        return S3Store(bucket=bucket, prefix=prefix, endpoint_url=settings.s3_endpoint_url)
    from storage.local import LocalStore

    return LocalStore(url)
