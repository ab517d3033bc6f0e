"""S3Store: keys under "s3://BUCKET/PREFIX", through boto3 (AWS S3, SeaweedFS, MinIO, R2 ...).

Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles,
instance roles); the endpoint from settings.s3_endpoint_url. Transient errors (5xx, throttling,
dropped connections) are retried a few times with short exponential backoff; a stream that is
already being read is not retried mid-way.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from storage import Store
from storage.errors import StorageError, StorageKeyNotFound, check_key

T = TypeVar("T")
MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                   "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed"}
# Multipart above 8 MiB, in 8 MiB parts: memory per upload stays at a few parts, whatever the file size.
TRANSFER = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=4)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return _error_code(exc) in TRANSIENT_CODES or status >= 500
    return isinstance(exc, BotoConnectionError)


_retrying = retry(retry=retry_if_exception(_is_transient), stop=stop_after_attempt(4),
                  wait=wait_exponential(multiplier=0.1, max=2), reraise=True)


class S3Store(Store):
    """Objects at s3://bucket/prefix/key."""

    def __init__(self, *, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        session = boto3.session.Session()
        self.client = client or session.client(
            "s3", endpoint_url=endpoint_url, region_name=session.region_name or "us-east-1",
            config=Config(retries={"mode": "standard", "max_attempts": 2}, s3={"addressing_style": "path"}))

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}')"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, key: str, fn: Callable[[], T]) -> T:
        """fn() with transient errors retried and a missing key turned into StorageKeyNotFound."""
        try:
            return _retrying(fn)()
        except ClientError as exc:
            if _error_code(exc) in MISSING_CODES:
                raise StorageKeyNotFound(key) from None
            raise StorageError(f"S3 {self.bucket}/{self._key(key)}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 {self.bucket}/{self._key(key)}: {exc}") from exc

    def put_stream(self, key: str, fileobj: BinaryIO) -> int:
        """Uploads fileobj (multipart above 8 MiB); returns the bytes written. Retried only if seekable."""
        counting = _CountingReader(fileobj)
        start = fileobj.tell() if fileobj.seekable() else None

        def upload() -> int:
            if counting.count:
                if start is None:  # half-consumed and not rewindable: give up rather than upload a tail
                    raise StorageError(f"upload of {key!r} failed and its stream cannot be rewound")
                fileobj.seek(start)
                counting.count = 0
            self.client.upload_fileobj(counting, self.bucket, self._key(key), Config=TRANSFER)
            return counting.count

        return self._call(key, upload)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Writes data to key with one PUT."""
        self._call(key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def open_stream(self, key: str) -> BinaryIO:
        """A buffered reader over the object's body; iterating it yields lines."""
        response = self._call(key, lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key)))
        return io.BufferedReader(_RawBody(response["Body"]), buffer_size=1 << 16)  # type: ignore[return-value]

    def get_bytes(self, key: str) -> bytes:
        """The whole object."""
        def read() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        return self._call(key, read)

    def delete(self, key: str) -> None:
        """Deletes the object; S3 treats a missing key as success."""
        self._call(key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def exists(self, key: str) -> bool:
        """Whether the object exists (a HEAD request)."""
        try:
            self.size(key)
        except StorageKeyNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        """The object's ContentLength."""
        head = self._call(key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        return int(head["ContentLength"])

    def list_keys(self, prefix: str) -> Iterator[str]:
        """ListObjectsV2 pages under the prefix, as genq keys (the store's own prefix removed)."""
        full = self._key(prefix.rstrip("/")) + ("/" if prefix.endswith("/") else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        pages = self._call(prefix, lambda: list(self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full)))
        return (item["Key"][strip:] for page in pages for item in page.get("Contents", []))


class _CountingReader(io.RawIOBase):
    """Counts the bytes boto3 reads from the wrapped stream."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _RawBody(io.RawIOBase):
    """A botocore StreamingBody as a raw stream, so io.BufferedReader can give lines."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.body.close()
        super().close()
