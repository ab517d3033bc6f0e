"""LocalStore: keys are relative paths under one root directory (embedded mode and single hosts)."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from storage import Store
from storage.errors import StorageKeyNotFound, check_key

COPY_CHUNK = 1 << 20


class LocalStore(Store):
    """Objects as files under root; writes go to a temporary file that is renamed into place."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise StorageKeyNotFound(key)
        return path

    def put_stream(self, key: str, fileobj: BinaryIO) -> int:
        """Copies fileobj to key in 1 MiB chunks; returns the bytes written."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := fileobj.read(COPY_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return written

    def put_bytes(self, key: str, data: bytes) -> None:
        """Writes data to key atomically."""
        self.put_stream(key, io.BytesIO(data))

    def open_stream(self, key: str) -> BinaryIO:
        """The file at key opened for binary reading."""
        try:
            return open(self._path(key), "rb")  # noqa: SIM115
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StorageKeyNotFound(key) from None

    def get_bytes(self, key: str) -> bytes:
        """The whole file at key."""
        return self._existing(key).read_bytes()

    def delete(self, key: str) -> None:
        """Removes the file at key, if any."""
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        """Whether a file is at key."""
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        """The file's length in bytes."""
        return self._existing(key).stat().st_size

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Files under the prefix directory (partial ".part" writes excluded)."""
        root = self._path(prefix.rstrip("/"))
        if not root.is_dir():
            return iter(())
        return (f"{prefix.rstrip('/')}/{p.relative_to(root).as_posix()}" for p in root.rglob("*")
                if p.is_file() and not p.name.endswith(".part"))
