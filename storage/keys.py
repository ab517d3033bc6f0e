"""Every storage key genq writes, named in this one module.

Keys are built from genq's own ids only (checked here), never from a user's string: a file name, a
custom_id or metadata never reaches a key or a path.

    files/{file_id}                              an uploaded or generated file's bytes
    batches/{batch_id}/shards/{index:05d}.jsonl  a shard's request lines
    batches/{batch_id}/{output|errors}.jsonl     a finished batch's result files
"""

from __future__ import annotations

import re

_ID = re.compile(r"(file-|batch_)[0-9a-f]{8,64}")


def _own_id(value: str) -> str:
    if not _ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a genq file or batch id; storage keys are built from those only")
    return value


def file_key(file_id: str) -> str:
    return f"files/{_own_id(file_id)}"


def batch_prefix(batch_id: str) -> str:
    """The prefix of every object of a batch (its shards and result files)."""
    return f"batches/{_own_id(batch_id)}/"


def shard_key(batch_id: str, index: int) -> str:
    return f"{batch_prefix(batch_id)}shards/{int(index):05d}.jsonl"


def batch_result_key(batch_id: str, kind: str) -> str:
    if kind not in ("output", "errors"):
        raise ValueError(f"unknown result file kind {kind!r}")
    return f"{batch_prefix(batch_id)}{kind}.jsonl"
