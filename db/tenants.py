"""Tenants and their API keys. A key's secret is shown once; only its sha256 is stored."""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from db.models import ApiKey, Tenant

KEY_PREFIX = "sk-genq-"
SHOWN_PREFIX_CHARS = 16  # "sk-genq-" + 8 characters of the secret: enough to tell keys apart


def hash_secret(secret: str) -> str:
    """The sha256 hex digest under which a key's secret is stored."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_tenant(*, session: Session, name: str) -> Tenant:
    """Adds a tenant named name (unique) and returns it; the caller commits."""
    tenant = Tenant(id=f"tenant_{secrets.token_hex(12)}", name=name, created_at=int(time.time()))
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant(*, session: Session, tenant: str) -> Tenant | None:
    """The tenant whose id or name is tenant, or None."""
    return session.scalars(select(Tenant).where(or_(Tenant.id == tenant, Tenant.name == tenant))).first()


def create_api_key(*, session: Session, tenant_id: str, secret: str | None = None) -> tuple[ApiKey, str]:
    """A new key for tenant_id and its plaintext secret (random "sk-genq-..." unless secret is given)."""
    secret = secret or KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=f"key_{secrets.token_hex(12)}", tenant_id=tenant_id, key_hash=hash_secret(secret),
                 prefix=secret[:SHOWN_PREFIX_CHARS], created_at=int(time.time()), revoked_at=None)
    session.add(key)
    session.flush()
    return key, secret


def revoke_api_key(*, session: Session, key: str) -> int:
    """Revokes the live keys whose id or shown prefix is key; returns how many were revoked."""
    result = session.execute(
        update(ApiKey)
        .where(or_(ApiKey.id == key, ApiKey.prefix == key), ApiKey.revoked_at.is_(None))
        .values(revoked_at=int(time.time()))
    )
    return result.rowcount


def list_api_keys(*, session: Session, tenant_id: str | None = None,
                  prefix: str | None = None) -> list[tuple[ApiKey, str]]:
    """(key, tenant name) for the keys of one tenant or all, revoked ones included, oldest first;
    prefix keeps those whose shown prefix starts with it. Secrets are never stored, so never listed."""
    query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    if prefix:
        query = query.where(ApiKey.prefix.startswith(prefix, autoescape=True))
    return [(key, name) for key, name in session.execute(query.order_by(ApiKey.created_at, ApiKey.id))]


def live_key(*, session: Session, secret: str) -> ApiKey | None:
    """The live (unrevoked) key whose secret is secret, or None.

    Looked up by the secret's sha256, so no comparison of secrets ever runs (nothing to time)."""
    return session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret),
                                                ApiKey.revoked_at.is_(None))).first()


def tenant_for_key(*, session: Session, secret: str) -> Tenant | None:
    """The tenant owning the live (unrevoked) key whose secret is secret, or None."""
    return session.scalars(
        select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_secret(secret), ApiKey.revoked_at.is_(None))
    ).first()


def ensure_bootstrap_key(*, session: Session, secret: str, tenant_name: str = "default") -> Tenant:
    """The tenant that secret authenticates, registering it under tenant_name if it is new (GENQ_BOOTSTRAP_API_KEY)."""
    known = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret))).first()
    if known is not None:  # a revoked bootstrap key stays revoked
        return session.get_one(Tenant, known.tenant_id)
    tenant = get_tenant(session=session, tenant=tenant_name) or create_tenant(session=session, name=tenant_name)
    create_api_key(session=session, tenant_id=tenant.id, secret=secret)
    return tenant
