"""Object ids that sort by creation time: "<prefix>" + 11 hex digits of milliseconds + 13 random hex digits."""

from __future__ import annotations

import secrets
import threading
import time

_lock = threading.Lock()
_last_ms = 0


def sortable_id(prefix: str) -> str:
    """A fresh id whose time part strictly increases within this process (so cursors page in creation order)."""
    global _last_ms
    with _lock:
        _last_ms = max(int(time.time() * 1000), _last_ms + 1)
        stamp = _last_ms
    return f"{prefix}{stamp:011x}{secrets.token_hex(7)[:13]}"
