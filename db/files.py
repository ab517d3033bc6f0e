"""Uploaded and generated files: metadata rows; the bytes live in storage under File.storage_key."""

from __future__ import annotations

import time
from typing import Literal

from sqlalchemy import ColumnElement, and_, delete, or_, select
from sqlalchemy.orm import Session

from db.ids import sortable_id
from db.models import File
from storage.keys import file_key

# File purposes: what users upload, and what genq writes for them.
BATCH_PURPOSE = "batch"
FINE_TUNE_PURPOSE = "fine-tune"
BATCH_OUTPUT_PURPOSE = "batch_output"
FINE_TUNE_RESULTS_PURPOSE = "fine-tune-results"


def new_file_id() -> str:
    """A fresh file id, "file-" + 24 hex digits: milliseconds then random, so ids sort by creation."""
    return sortable_id("file-")


def file_storage_key(file_id: str) -> str:
    """The storage key that holds a file's bytes."""
    return file_key(file_id)


def create_file(*, session: Session, tenant_id: str, file_id: str, filename: str, purpose: str, size: int,
                expires_at: int | None = None, storage_key: str | None = None) -> File:
    """Records a file whose bytes are already stored at storage_key (default file_storage_key(file_id));
    the caller commits."""
    row = File(id=file_id, tenant_id=tenant_id, filename=filename, purpose=purpose, bytes=size,
               created_at=int(time.time()), expires_at=expires_at,
               storage_key=storage_key or file_storage_key(file_id))
    session.add(row)
    session.flush()
    return row


def get_file(*, session: Session, tenant_id: str, file_id: str) -> File | None:
    """The tenant's file with this id, or None (also for another tenant's file)."""
    return session.scalars(select(File).where(File.id == file_id, File.tenant_id == tenant_id)).first()


def list_files(*, session: Session, tenant_id: str, after: str | None = None, limit: int = 10_000,
               order: Literal["asc", "desc"] = "desc", purpose: str | None = None) -> tuple[list[File], bool]:
    """A page of the tenant's files by created_at (then id) and whether more follow the page."""
    query = select(File).where(File.tenant_id == tenant_id)
    if purpose:
        query = query.where(File.purpose == purpose)
    descending = order == "desc"
    if after:
        query = query.where(_after_cursor(session=session, tenant_id=tenant_id, after=after, descending=descending))
    if descending:
        query = query.order_by(File.created_at.desc(), File.id.desc())
    else:
        query = query.order_by(File.created_at.asc(), File.id.asc())
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def _after_cursor(*, session: Session, tenant_id: str, after: str, descending: bool) -> ColumnElement[bool]:
    """Rows past the file `after` in (created_at, id) order; by id alone if it is gone (ids sort by time)."""
    cursor = get_file(session=session, tenant_id=tenant_id, file_id=after)
    if cursor is None:
        return File.id < after if descending else File.id > after
    created, ident = cursor.created_at, cursor.id
    if descending:
        return or_(File.created_at < created, and_(File.created_at == created, File.id < ident))
    return or_(File.created_at > created, and_(File.created_at == created, File.id > ident))


def delete_file(*, session: Session, tenant_id: str, file_id: str) -> File | None:
    """Deletes the tenant's file row and returns it (the caller removes its bytes after commit), or None."""
    row = get_file(session=session, tenant_id=tenant_id, file_id=file_id)
    if row is not None:
        session.execute(delete(File).where(File.id == row.id))
    return row
