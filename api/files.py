"""/v1/files: upload (streamed to storage), list, retrieve, content, delete."""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.auth import TenantDep
from api.batch_input import MAX_LINE_BYTES
from api.deps import SessionDep, SettingsDep, StoreDep
from api.errors import InvalidRequest, no_such
from api.schemas import FileDeleted, FileList, FileObject
from api.upload_limits import JsonlLimits
from api.uploads import receive_upload
from db.files import (
    BATCH_PURPOSE,
    FINE_TUNE_PURPOSE,
    create_file,
    delete_file,
    file_storage_key,
    get_file,
    list_files,
    new_file_id,
)
from db.models import File
from genq.json_guard import MAX_JSON_DEPTH
from storage import StorageError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["files"])
UPLOAD_PURPOSES = (BATCH_PURPOSE, FINE_TUNE_PURPOSE)
MIN_EXPIRY_SECONDS, MAX_EXPIRY_SECONDS = 3600, 2_592_000
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary"},
        "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
        "expires_after[seconds]": {"type": "integer", "minimum": MIN_EXPIRY_SECONDS,
                                   "maximum": MAX_EXPIRY_SECONDS}}}}}}}


def upload_purpose_and_expiry(fields: dict[str, str]) -> tuple[str, int | None]:
    """(purpose, expires_at) from the upload's text fields, or InvalidRequest."""
    purpose = fields.get("purpose")
    if not purpose:
        raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose",
                             code="missing_required_parameter")
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}.", param="purpose",
                             code="invalid_value")
    seconds = fields.get("expires_after[seconds]")
    if seconds is None:
        return purpose, None
    # isascii: str.isdigit() also accepts digits such as "³" that int() rejects
    if fields.get("expires_after[anchor]", "created_at") != "created_at" \
            or not (seconds.isascii() and seconds.isdigit()) \
            or not MIN_EXPIRY_SECONDS <= int(seconds) <= MAX_EXPIRY_SECONDS:
        raise InvalidRequest(f"expires_after needs anchor 'created_at' and {MIN_EXPIRY_SECONDS} to "
                             f"{MAX_EXPIRY_SECONDS} seconds.", param="expires_after", code="invalid_value")
    return purpose, int(time.time()) + int(seconds)


def _tenant_file(session: SessionDep, tenant_id: str, file_id: str) -> File:
    row = get_file(session=session, tenant_id=tenant_id, file_id=file_id)
    if row is None:
        raise no_such("File object", file_id, param="id")
    return row


@router.post("/files", response_model=FileObject, openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request, tenant_id: TenantDep, session: SessionDep, settings: SettingsDep,
                      store: StoreDep) -> FileObject:
    """Stores the multipart 'file' (at most settings.max_file_bytes; 413 beyond) and records it."""
    file_id = new_file_id()
    key = file_storage_key(file_id)
    lines = JsonlLimits(max_lines=settings.max_batch_requests, max_line_bytes=MAX_LINE_BYTES, max_depth=MAX_JSON_DEPTH)
    upload = await receive_upload(request, store=store, key=key, limit=settings.max_file_bytes, lines=lines)

    def record() -> File:
        purpose, expires_at = upload_purpose_and_expiry(upload.fields)
        row = create_file(session=session, tenant_id=tenant_id, file_id=file_id, filename=upload.filename,
                          purpose=purpose, size=upload.size, expires_at=expires_at)
        session.commit()
        return row

    try:
        return FileObject.from_row(await run_in_threadpool(record))
    except Exception:
        with suppress(StorageError):  # the client gets the original error
            await run_in_threadpool(store.delete, key)  # no row names these bytes
        raise


@router.get("/files", response_model=FileList)
def list_tenant_files(tenant_id: TenantDep, session: SessionDep, after: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                      order: Literal["asc", "desc"] = "desc", purpose: str | None = None) -> FileList:
    """A page of the tenant's files."""
    rows, has_more = list_files(session=session, tenant_id=tenant_id, after=after, limit=limit, order=order,
                                purpose=purpose)
    return FileList(data=[FileObject.from_row(row) for row in rows], has_more=has_more)


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, tenant_id: TenantDep, session: SessionDep) -> FileObject:
    """The tenant's file."""
    return FileObject.from_row(_tenant_file(session, tenant_id, file_id))


@router.get("/files/{file_id}/content", response_class=StreamingResponse)
def file_content(file_id: str, tenant_id: TenantDep, session: SessionDep, store: StoreDep) -> StreamingResponse:
    """The file's bytes, streamed from storage."""
    row = _tenant_file(session, tenant_id, file_id)
    chunks = store.iter_chunks(row.storage_key)
    return StreamingResponse(chunks, media_type="application/octet-stream",
                             headers={"Content-Length": str(row.bytes),
                                      "Content-Disposition": f"attachment; filename*=UTF-8''{quote(row.filename)}"})


@router.delete("/files/{file_id}", response_model=FileDeleted)
def remove_file(file_id: str, tenant_id: TenantDep, session: SessionDep, store: StoreDep) -> FileDeleted:
    """Deletes the file's record, then its bytes."""
    row = delete_file(session=session, tenant_id=tenant_id, file_id=file_id)
    if row is None:
        raise no_such("File object", file_id, param="id")
    session.commit()
    try:
        store.delete(row.storage_key)
    except StorageError as exc:  # the record is gone; orphaned bytes are only wasted space
        log.warning("file %s deleted but its bytes at %s remain: %s", file_id, row.storage_key, exc)
    return FileDeleted(id=file_id)
