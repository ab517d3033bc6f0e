"""Storage errors, shared by every backend."""

from __future__ import annotations


class StorageError(Exception):
    """A storage operation failed for a reason other than a missing key."""


class StorageKeyNotFound(StorageError, KeyError):
    """The key holds no object."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"no object at storage key {self.key!r}"


def check_key(key: str) -> str:
    """key itself, or ValueError for a key that could escape its root ("..", absolute, empty)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid storage key {key!r}")
    return key
