"""What parsed JSON from a client may not hold, checked once at the edge (API bodies, batch lines).

Python's json module accepts things no later step can keep: a lone surrogate escape such as
\\ud800 (valid JSON, but a str with no UTF-8 encoding, so storing or echoing it fails), a NUL
(PostgreSQL text cannot hold one), and nesting thousands deep (recursive code downstream overflows).
"""

from __future__ import annotations

import re
from typing import Any

MAX_JSON_DEPTH = 32  # a chat body nests about 6 deep
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def has_control_character(text: str) -> bool:
    """True when text holds a C0 control character, DEL or a lone surrogate: never right in an id,
    a file name, a URL or a query value."""
    return _CONTROL.search(text) is not None


def json_problem(value: Any, *, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why parsed JSON cannot be accepted, or None; walks iteratively, so depth cannot break it."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            found = _UNSTORABLE.search(item)
            if found:
                what = "a NUL character" if found.group() == "\x00" else "a lone surrogate escape (\\ud800-\\udfff)"
                return f"holds {what}, which is not storable text"
        elif isinstance(item, dict | list):
            if depth > max_depth:
                return f"nests JSON deeper than {max_depth} levels"
            stack.extend((child, depth + 1) for child in ([*item, *item.values()] if isinstance(item, dict) else item))
    return None
