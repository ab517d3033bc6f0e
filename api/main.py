"""Builds the FastAPI app: settings, store, error handlers and one router per resource.

Run with `uvicorn api.main:app` (settings from the environment) or build one with create_app(settings).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api import batches, files, health, models
from api.errors import install_error_handlers
from db.session import session_scope
from db.tenants import ensure_bootstrap_key
from genq.settings import Settings, get_settings
from storage import store_from_settings

log = logging.getLogger(__name__)


def register_bootstrap_key(settings: Settings) -> None:
    """Makes GENQ_BOOTSTRAP_API_KEY a live key of the "default" tenant (first start of a deployment)."""
    if settings.bootstrap_api_key:
        with session_scope(settings.resolved_database_url()) as session:
            ensure_bootstrap_key(session=session, secret=settings.bootstrap_api_key)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The genq API for settings (default: from the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            await run_in_threadpool(register_bootstrap_key, settings)
        except Exception as exc:  # noqa: BLE001 -- the API still starts; /health shows the database state
            log.warning("could not register the bootstrap API key: %s", exc)
        yield

    app = FastAPI(title="genq", version="0.1.0", lifespan=lifespan,
                  description="Self-hosted, OpenAI-compatible Files and Batch API.")
    app.state.settings = settings
    app.state.store = store_from_settings(settings)
    install_error_handlers(app)
    for module in (files, batches, models, health):
        app.include_router(module.router)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn api.main:app` reads the environment only when it asks for the app, not on import.
    if name == "app":
        return create_app()
    raise AttributeError(name)
