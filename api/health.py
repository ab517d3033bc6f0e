"""/health: whether the database, storage and broker answer (200 ok, 503 degraded). No auth."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from kombu import Connection
from sqlalchemy import text

from api.deps import SettingsDep, StoreDep
from api.schemas import Health
from db.session import get_engine
from genq.settings import Settings
from storage import Store

router = APIRouter(tags=["health"])
PROBE_KEY = "health/probe"


def dependency_checks(settings: Settings, store: Store) -> dict[str, str]:
    """"ok", "disabled" or "error: ..." for each dependency."""

    def database() -> None:
        with get_engine(settings.resolved_database_url()).connect() as connection:
            connection.execute(text("SELECT 1"))

    def broker() -> None:
        with Connection(settings.broker_url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)

    return {"database": _probe(database), "storage": _probe(lambda: store.exists(PROBE_KEY)),
            "broker": _probe(broker) if settings.broker_url else "disabled"}


def _probe(check: Callable[[], object]) -> str:
    try:
        check()
    except Exception as exc:  # noqa: BLE001 -- reported, not raised
        return f"error: {type(exc).__name__}"
    return "ok"


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
def health(settings: SettingsDep, store: StoreDep) -> JSONResponse:
    """200 when every dependency answers, else 503 with what failed."""
    checks = dependency_checks(settings, store)
    healthy = all(value in ("ok", "disabled") for value in checks.values())
    body = Health(status="ok" if healthy else "degraded", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)
