"""Builds the FastAPI app: settings, store, error handlers and one router per resource.

Run with `uvicorn api.main:app` (settings from the environment) or build one with create_app(settings).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api import batches, feedback, files, fine_tuning, health, limits, models
from api.auth import KeyCache
from api.errors import install_error_handlers
from api.input_guard import InputGuard
from api.limits import RateLimiter
from db.session import session_scope
from db.tenants import ensure_bootstrap_key
from genq.settings import Settings, get_settings
from storage import store_from_settings

log = logging.getLogger(__name__)
API_DESCRIPTION = """Self-hosted, OpenAI-compatible Files and Batch API; point the official SDK at `/v1`.

Differences from OpenAI, all additive:
- **Validation is synchronous**: `POST /v1/batches` checks every line of the input file and answers 400 with
  the first error's `code`, `param` and `line` (1-based), and up to 20 errors in `error.errors.data`.
- **completion_window**: `"24h"` or any `"<N>h"` / `"<N>d"` up to 365 days (`"1h"`, `"72h"`, `"7d"`).
  Omitted: the deployment default.
- **One batch, several models**: lines may name different models; `model` lists them, comma-separated.
- **Live progress**: `request_counts` also has `in_progress` and `queued`; `usage` sums the tokens so far.
- **Idempotency-Key** header on `POST /v1/batches`: the same key and body return the same batch; the same
  key with another body is 409 `idempotency_key_reused`.
- **Cancel**: an `in_progress` batch becomes `cancelling`; cancelling a `cancelling` or `cancelled` batch
  returns it unchanged; a `finalizing`, `completed`, `failed` or `expired` batch is 409 `batch_not_cancellable`.
  Every 409 carries `x-should-retry: false` so the SDK does not retry it.
- **Extensions**: `GET /v1/batches/{id}/partial` streams the output lines written so far (`?errors=true`: the
  error lines); `POST /v1/batches/{id}/retry_failed` makes a new batch (`retried_from`) of a finished batch's
  failed and never-run requests.
- Uploads larger than the deployment's limit are 413 `file_too_large`; purposes are `batch` and `fine-tune`.
- **Fine-tuning** (`/v1/fine_tuning/jobs`, OpenAI's wire format): the model and every line of the files are
  checked at create (400 with the code and `error.line`), so a job starts `queued`; LoRA settings in the `lora`
  extension of the body. Fine-tuned models are their tenant's alone; `DELETE /v1/models/{id}` removes one.
- **Feedback**: `POST|GET /v1/batches/{id}/feedback` rates a finished batch's lines (`good`/`bad`/1-5, an optional
  correction); `POST /v1/batches/{id}/feedback/export` makes a DPO or supervised fine-tune file of them.
- **Limits**: each key has a requests-per-minute limit (`x-ratelimit-*-requests` headers on every response) and
  each tenant caps on requests and tokens queued; past one, 429 with `retry-after` and a message naming the
  limit and its numbers. `GET /v1/genq/limits` shows them all.
"""


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

    app = FastAPI(title="genq", version="0.1.0", lifespan=lifespan, description=API_DESCRIPTION)
    app.state.settings = settings
    app.state.store = store_from_settings(settings)
    app.state.rate_limiter = RateLimiter(settings)
    app.state.key_cache = KeyCache(settings.api_key_cache_seconds)
    install_error_handlers(app)
    app.add_middleware(InputGuard)
    for module in (files, batches, feedback, fine_tuning, models, limits, health):
        app.include_router(module.router)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn api.main:app` reads the environment only when it asks for the app, not on import.
    if name == "app":
        return create_app()
    raise AttributeError(name)
