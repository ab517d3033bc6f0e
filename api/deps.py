"""Request dependencies: the app's settings and store, and a database session per request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from db.session import get_sessionmaker
from genq.settings import Settings
from storage import Store


# The dependencies without I/O are async: FastAPI runs a sync one on a thread-pool hop, which costs
# more than the dependency itself on every request.
async def get_app_settings(request: Request) -> Settings:
    """The Settings the app was built with."""
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    """The app's Store (one per app: its S3 client is reused)."""
    return request.app.state.store


def get_session(settings: Annotated[Settings, Depends(get_app_settings)]) -> Iterator[Session]:
    """A session for this request; handlers commit explicitly, anything uncommitted is rolled back."""
    with get_sessionmaker(settings.resolved_database_url())() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
SessionDep = Annotated[Session, Depends(get_session)]
