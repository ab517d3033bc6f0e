"""Session fixtures that start real services once; each test cleans what it made."""

import os

# Triton kernels run in the interpreter on CPU machines; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from tests import services  # noqa: E402


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL database for in-process tests, dropped at the end of the session."""
    with services.fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url():
    return services.redis_test_url()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = services.start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    services.stop(server.process)


@pytest.fixture
def session(postgres_url):
    """A session on the test PostgreSQL database, rolled back at the end."""
    from db.session import get_sessionmaker

    with get_sessionmaker(postgres_url)() as session:
        yield session
        session.rollback()


@pytest.fixture
def tenant(session):
    """A new tenant, deleted afterwards with everything it owns."""
    import uuid

    from sqlalchemy import delete

    from db.models import Tenant
    from db.tenants import create_tenant

    tenant = create_tenant(session=session, name=f"t-{uuid.uuid4().hex[:8]}")
    session.commit()
    yield tenant
    session.rollback()
    session.execute(delete(Tenant).where(Tenant.id == tenant.id))
    session.commit()
