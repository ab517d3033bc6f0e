"""A session on the test PostgreSQL database and a tenant that is deleted (with all it owns) afterwards."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import delete

from db.models import Tenant
from db.session import get_sessionmaker
from db.tenants import create_tenant


@pytest.fixture
def session(postgres_url):
    with get_sessionmaker(postgres_url)() as session:
        yield session
        session.rollback()


@pytest.fixture
def tenant(session):
    tenant = create_tenant(session=session, name=f"t-{uuid.uuid4().hex[:8]}")
    session.commit()
    yield tenant
    session.rollback()
    session.execute(delete(Tenant).where(Tenant.id == tenant.id))
    session.commit()
