"""Limits on a JSONL upload, checked chunk by chunk while it streams (before it is all stored).

Every purpose genq takes (batch, fine-tune) is JSONL, one request or example per line:
- at most max_lines non-blank lines (a batch holds at most max_batch_requests);
- no line longer than max_line_bytes (one request that large is a JSON array or a binary file);
- no JSON nested deeper than max_depth. Checked by a scan that skips strings, run only on lines
  with more brackets than max_depth, so an ordinary line costs two counts.
A broken line is refused here only for these limits; its content is validated at batch create.
The one binary upload genq takes, an image dataset for a GAN or VAE fine-tune (a zip, or an .npz,
which is a zip too), is told by its first bytes, the zip signature, and passes unchecked here: its
members are checked by the worker that reads it (workers/images/data.py). A zip uploaded as a batch
input is refused at batch create, whose line check reads it as JSONL and refuses its first line.
"""

from __future__ import annotations

import re

from api.errors import InvalidRequest

ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record
# A JSON string, skipped whole (to its closing quote, or to the end of an unterminated one, possessively:
# linear whatever the line), or a bracket.
_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.)*+"?|[\[\]{}]')


def nesting_depth(line: bytes) -> int:
    """The deepest bracket nesting of a JSON text, strings ignored."""
    depth = deepest = 0
    for token in _TOKENS.finditer(line):
        mark = token.group()
        if mark in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif mark in (b"]", b"}"):
            depth -= 1
    return deepest


class JsonlLimits:
    """Feed it the upload's bytes in order; it raises InvalidRequest (400) naming the line."""

    def __init__(self, *, max_lines: int, max_line_bytes: int, max_depth: int) -> None:
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self.max_depth = max_depth
        self.line_number = 0  # lines completed so far
        self.requests = 0  # of them, non-blank
        self.partial = bytearray()  # the line still being received
        self.head = b""  # the upload's first bytes, until there are enough to tell a zip archive
        self.archive = False  # a zip archive: not JSONL, nothing to check here

    def feed(self, chunk: bytes) -> None:
        if len(self.head) < 4:
            self.head += chunk[: 4 - len(self.head)]
            self.archive = self.head.startswith(ZIP_SIGNATURES)
        if self.archive:
            return
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            self._line(chunk[start:end])
            start = end + 1
        self.partial += chunk[start:]
        if len(self.partial) > self.max_line_bytes:
            self._refuse(self.line_number + 1, "line_too_long", f"is longer than {self.max_line_bytes} bytes; "
                         "the file must be JSONL, one request per line")

    def finish(self) -> None:
        if self.partial and not self.archive:
            self._line(b"")

    def _line(self, tail: bytes) -> None:
        line = bytes(self.partial) + tail if self.partial else tail
        self.partial = bytearray()
        self.line_number += 1
        if len(line) > self.max_line_bytes:
            self._refuse(self.line_number, "line_too_long", f"is longer than {self.max_line_bytes} bytes; "
                         "the file must be JSONL, one request per line")
        if not line.strip():
            return
        self.requests += 1
        if self.requests > self.max_lines:
            self._refuse(self.line_number, "too_many_lines", f"the file has more than {self.max_lines} lines, "
                         "the most one batch may hold")
        if line.count(b"{") + line.count(b"[") > self.max_depth and nesting_depth(line) > self.max_depth:
            self._refuse(self.line_number, "json_too_deep", f"nests JSON deeper than {self.max_depth} levels")

    @staticmethod
    def _refuse(line: int, code: str, what: str) -> None:
        raise InvalidRequest(f"Line {line}: {what}.", param="file", code=code, extra={"line": line})
