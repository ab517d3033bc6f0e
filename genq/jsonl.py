"""Reading OpenAI batch files: one JSON object with a string custom_id per non-blank line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def batch_lines(path: Path, error: type[Exception], label: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line, object) for every non-blank line; `error` naming the file (as label) and the line
    for one that is not a batch line. Split on \\n only: JSON text may hold U+2028, which
    str.splitlines splits on."""
    label = label or str(path)
    objects = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except ValueError as exc:
                raise error(f"{label} line {number}: not JSON ({exc})") from None
            if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
                raise error(f"{label} line {number}: not a batch line with a string custom_id")
            objects.append((number, item))
    return objects
