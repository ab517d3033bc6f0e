"""Bearer API key -> tenant id, counted against the key's rate limit.

401 invalid_api_key for a missing, unknown or revoked key; 429 past the key's requests per minute.
Responses of authenticated routes carry OpenAI's x-ratelimit-*-requests headers (not error
responses, nor the streamed file content and partial results). A key's
lookup is kept for settings.api_key_cache_seconds per API process (a status poll is then two
queries, not three), so a revoked key stops working within that time.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.deps import SessionDep
from api.errors import Authentication
from db.tenants import hash_secret, live_key

bearer = HTTPBearer(auto_error=False, description="An API key created with `genq keys create`")


class KeyCache:
    """secret hash -> ((tenant id, key id), when it was looked up); only live keys are kept."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: dict[str, tuple[tuple[str, str], float]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> tuple[str, str] | None:
        with self._lock:
            entry = self._entries.get(digest)
        if entry is None or time.monotonic() - entry[1] > self.seconds:
            return None
        return entry[0]

    def put(self, digest: str, key: tuple[str, str]) -> None:
        if self.seconds <= 0:
            return
        with self._lock:
            if len(self._entries) > 10_000:  # many distinct keys: start over rather than grow without bound
                self._entries.clear()
            self._entries[digest] = (key, time.monotonic())


def current_key(request: Request, response: Response, session: SessionDep,
                credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> tuple[str, str]:
    """(tenant id, key id) of the live key the request carries, once its rate limit let it through."""
    if credentials is None or not credentials.credentials:
        raise Authentication("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
    cache: KeyCache = request.app.state.key_cache
    digest = hash_secret(credentials.credentials)
    found = cache.get(digest)
    if found is None:
        key = live_key(session=session, secret=credentials.credentials)
        if key is None:
            raise Authentication(f"Incorrect API key provided: {credentials.credentials[:12]}****.")
        found = (key.tenant_id, key.id)
        cache.put(digest, found)
    state = request.app.state.rate_limiter.hit(found[1])
    response.headers.update(state.headers())
    return found


async def current_tenant_id(key: Annotated[tuple[str, str], Depends(current_key)]) -> str:
    """The id of the tenant whose live key the request carries."""
    return key[0]


KeyDep = Annotated[tuple[str, str], Depends(current_key)]
TenantDep = Annotated[str, Depends(current_tenant_id)]
