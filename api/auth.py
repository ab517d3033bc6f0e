"""Bearer API key -> tenant id; 401 invalid_api_key for a missing, unknown or revoked key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.deps import SessionDep
from api.errors import Authentication
from db.tenants import tenant_for_key

bearer = HTTPBearer(auto_error=False, description="An API key created with `genq keys create`")


def current_tenant_id(session: SessionDep,
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The id of the tenant whose live key the request carries."""
    if credentials is None or not credentials.credentials:
        raise Authentication("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
    tenant = tenant_for_key(session=session, secret=credentials.credentials)
    if tenant is None:
        raise Authentication(f"Incorrect API key provided: {credentials.credentials[:12]}****.")
    return tenant.id


TenantDep = Annotated[str, Depends(current_tenant_id)]
