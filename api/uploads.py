"""Streams a multipart upload's file part straight into storage, with a size cap.

The request body is parsed incrementally (python-multipart); file bytes go through a bounded pipe to
a thread running Store.put_stream, so neither memory nor local disk ever holds the whole file, and
an oversized upload is cut off as soon as it passes the cap.
"""

from __future__ import annotations

import asyncio
import io
import queue
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from api.errors import InvalidRequest, PayloadTooLarge
from api.upload_limits import JsonlLimits
from genq.json_guard import has_control_character
from storage import Store

MAX_FIELD_BYTES = 64 * 1024  # a text field (purpose, expires_after[...]) is small
MULTIPART_OVERHEAD = 1 << 20  # headers and boundaries around the file part, for the Content-Length precheck
PIPE_DEPTH = 32  # chunks (~64 KiB each) waiting for the storage thread
MAX_FILENAME_CHARS = 512  # files.filename


@dataclass
class ReceivedUpload:
    """An upload whose file bytes are already in storage."""

    filename: str  # from the file part's Content-Disposition
    size: int  # bytes stored
    fields: dict[str, str] = field(default_factory=dict)  # the text fields, e.g. purpose


class _ChunkPipe(io.RawIOBase):
    """Bytes handed by the event loop to the storage thread; an exception item aborts the reader."""

    def __init__(self) -> None:
        self.queue: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=PIPE_DEPTH)
        self.pending = memoryview(b"")
        self.finished = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending and not self.finished:
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                self.finished = True
            else:
                self.pending = memoryview(item)
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


def _checked_filename(raw: bytes) -> str:
    """The upload's name as the client gave it (kept only as metadata: never part of a storage key)."""
    name = raw.decode("utf-8", "replace") or "upload"
    if len(name) > MAX_FILENAME_CHARS:
        raise InvalidRequest(f"The file name is longer than {MAX_FILENAME_CHARS} characters.", param="file",
                             code="invalid_value")
    if has_control_character(name):
        raise InvalidRequest("The file name holds a control character.", param="file", code="invalid_value")
    return name


class _UploadParser:
    """python-multipart callbacks: text fields into a dict, file data into a list drained after each write."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.headers: dict[bytes, bytes] = {}
        self.header_name = b""
        self.header_value = b""
        self.part_name = ""
        self.in_file = False
        self.filename: str | None = None
        self.field_data = bytearray()
        self.file_chunks: list[bytes] = []
        self.file_ended = False

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished}

    def on_part_begin(self) -> None:
        self.headers, self.field_data, self.in_file = {}, bytearray(), False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_name.lower()] = self.header_value
        self.header_name, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.part_name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            if self.filename is not None:
                raise InvalidRequest("Send exactly one file per upload.", param="file", code="invalid_value")
            self.in_file = True
            self.filename = _checked_filename(options[b"filename"])

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.file_chunks.append(bytes(data[start:end]))
        elif len(self.field_data) + end - start > MAX_FIELD_BYTES:
            raise InvalidRequest(f"Form field {self.part_name!r} is too long.", param=self.part_name,
                                 code="invalid_value")
        else:
            self.field_data += data[start:end]

    def on_part_end(self) -> None:
        if self.in_file:
            self.file_ended = True
        else:
            self.fields[self.part_name] = self.field_data.decode("utf-8", "replace")


async def receive_upload(request: Request, *, store: Store, key: str, limit: int,
                         lines: JsonlLimits | None = None) -> ReceivedUpload:
    """Parses the multipart body, storing its one file part at key; raises PayloadTooLarge past limit
    bytes, and lines' InvalidRequest when the JSONL passes one of its limits (checked as it streams)."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise InvalidRequest("Upload files as multipart/form-data with a 'file' and a 'purpose' field.",
                             param="file", code="invalid_value")
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(f"The file is larger than the {limit}-byte limit of this deployment.", param="file")
    state = _UploadParser()
    parser = MultipartParser(options[b"boundary"], state.callbacks())  # type: ignore[arg-type]
    pipe = _ChunkPipe()
    upload: asyncio.Future[int] | None = None
    size = 0
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if state.filename is not None and upload is None:
                upload = asyncio.get_running_loop().run_in_executor(None, store.put_stream, key, pipe)
            for piece in state.file_chunks:
                size += len(piece)
                if size > limit:
                    raise PayloadTooLarge(f"The file is larger than the {limit}-byte limit of this deployment.",
                                          param="file")
                if lines is not None:
                    lines.feed(piece)
                await _send(pipe, piece, upload)
            state.file_chunks.clear()
        parser.finalize()
        if upload is None or not state.file_ended:
            raise InvalidRequest("Missing required parameter: 'file'.", param="file",
                                 code="missing_required_parameter")
        if lines is not None:
            lines.finish()
        await _send(pipe, None, upload)
        stored = await upload
    except BaseException as exc:
        if upload is not None:
            await _abort(pipe, upload, exc)
            with suppress(Exception):  # the client gets the original error, not a cleanup failure
                await run_in_threadpool(store.delete, key)
        if isinstance(exc, FormParserError):
            raise InvalidRequest("The multipart body is malformed.", param="file", code="invalid_value") from exc
        raise
    return ReceivedUpload(filename=state.filename or "upload", size=stored, fields=state.fields)


async def _send(pipe: _ChunkPipe, item: bytes | None, upload: asyncio.Future[int] | None) -> None:
    """Puts item into the pipe, waiting while it is full, unless the storage thread already stopped."""
    while True:
        if upload is not None and upload.done():
            upload.result()  # raises the storage error, if that is why it stopped
            raise RuntimeError("the storage upload finished before the body ended")
        try:
            pipe.queue.put_nowait(item)
            return
        except queue.Full:
            await asyncio.sleep(0.002)


async def _abort(pipe: _ChunkPipe, upload: asyncio.Future[int], exc: BaseException) -> None:
    """Makes the storage thread stop with exc and waits for it."""
    while not upload.done():
        try:
            pipe.queue.put_nowait(exc if isinstance(exc, Exception) else RuntimeError("upload aborted"))
            break
        except queue.Full:
            try:
                pipe.queue.get_nowait()  # make room: the thread will read the abort next
            except queue.Empty:
                pass
    try:
        await upload
    except BaseException:  # noqa: BLE001,S110 -- the original error is what the client gets
        pass
