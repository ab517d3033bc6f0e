"""Runs Alembic migrations programmatically (`genq migrate`, the test fixtures, embedded mode)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from db.session import normalize_url

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


def upgrade_to_head(url: str) -> None:
    """Brings the database at url to the newest schema; a no-op when it is already there."""
    command.upgrade(alembic_config(url), "head")
