"""Fixtures of the fault-injection suite: one private deployment per test (see harness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.e2e.conftest import tiny_models_file  # noqa: F401 -- a session fixture the deployments serve
from tests.fault.harness import Deployment, new_deployment
from tests.services import fresh_postgres_database


@pytest.fixture
def deploy(request, tmp_path, s3_server, tiny_models_file) -> Iterator[Callable[..., Deployment]]:  # noqa: F811
    """deploy(private_postgres=False, private_s3=False, **env) -> a Deployment with its API started.

    Its Redis is always private (a test may restart or flush it); its database is a fresh one in the
    shared cluster unless private_postgres; its store is the session's SeaweedFS unless private_s3.
    On failure the deployment's logs are printed."""
    made: list[Deployment] = []
    databases = []

    def make(*, private_postgres: bool = False, private_s3: bool = False, api: bool = True,
             **env: str) -> Deployment:
        database_url = None
        if not private_postgres:
            databases.append(fresh_postgres_database())
            database_url = databases[-1].__enter__()
        deployment = new_deployment(tmp_path / f"d{len(made)}", database_url=database_url, s3_server=s3_server,
                                    private_postgres=private_postgres, private_s3=private_s3, env=env,
                                    models_file=tiny_models_file)
        made.append(deployment)
        if api:
            deployment.start_api()
        return deployment

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for deployment in made:
        if failed:
            print(deployment.log_tail(6000))
        deployment.close()
    for database in databases:
        database.__exit__(None, None, None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.rep_call = report
    return report
