"""Bearer API key -> tenant id, counted against the key's rate limit.

401 invalid_api_key for a missing, unknown or revoked key; 429 past the key's requests per minute.
Every response of an authenticated route carries OpenAI's x-ratelimit-*-requests headers.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.deps import SessionDep
from api.errors import Authentication
from db.tenants import live_key

bearer = HTTPBearer(auto_error=False, description="An API key created with `genq keys create`")


def current_key(request: Request, response: Response, session: SessionDep,
                credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> tuple[str, str]:
    """(tenant id, key id) of the live key the request carries, once its rate limit let it through."""
    if credentials is None or not credentials.credentials:
        raise Authentication("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
    key = live_key(session=session, secret=credentials.credentials)
    if key is None:
        raise Authentication(f"Incorrect API key provided: {credentials.credentials[:12]}****.")
    state = request.app.state.rate_limiter.hit(key.id)
    response.headers.update(state.headers())
    return key.tenant_id, key.id


def current_tenant_id(key: Annotated[tuple[str, str], Depends(current_key)]) -> str:
    """The id of the tenant whose live key the request carries."""
    return key[0]


KeyDep = Annotated[tuple[str, str], Depends(current_key)]
TenantDep = Annotated[str, Depends(current_tenant_id)]
