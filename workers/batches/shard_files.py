"""Reading a shard's input file: JSONL lines {"line": n, "custom_id": ..., "body": {...}} in storage."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from storage import Store


@dataclass
class InputLine:
    """One request of a shard: its 1-based line in the batch's input file, custom_id and body."""

    line: int
    custom_id: str
    body: Any


def read_shard_lines(store: Store, input_key: str) -> list[InputLine]:
    """The requests of the shard file at input_key, in file order."""
    lines = []
    for raw in store.get_bytes(input_key).splitlines():
        if raw.strip():
            item = json.loads(raw)
            lines.append(InputLine(line=int(item["line"]), custom_id=str(item["custom_id"]), body=item.get("body")))
    return lines
