"""Framing of the parent <-> worker pipe protocol. Pure: stdlib only, shared by both sides.

A frame is ``!II`` (header length, blob length), a JSON header, then an opaque blob::

    +--------+--------+----------------+-----------------+
    | u32 hl | u32 bl | header (JSON)  | blob (bytes)    |
    +--------+--------+----------------+-----------------+

Headers are JSON so that the agent never has to unpickle what an untrusted worker says:
the blob (a pickle) is only read by a parent that runs its own user's code (local mode).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

_PREFIX = struct.Struct("!II")
PREFIX_SIZE = _PREFIX.size
#: Upper bound on one frame; a worker claiming more is treated as broken.
MAX_FRAME = 256 * 1024 * 1024


class FrameError(Exception):
    """The peer sent something that is not a frame, or closed the pipe (``eof``)."""

    def __init__(self, message: str, *, eof: bool = False) -> None:
        super().__init__(message)
        self.eof = eof


def encode_frame(header: dict[str, Any], blob: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(len(head), len(blob)) + head + blob


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def parse_prefix(buf: bytes | bytearray) -> tuple[int, int]:
    """Header and blob lengths from the first PREFIX_SIZE bytes of ``buf``."""
    head_len, blob_len = _PREFIX.unpack_from(buf)
    if head_len + blob_len > MAX_FRAME:
        raise FrameError(f"frame of {head_len + blob_len} bytes exceeds {MAX_FRAME}")
    return head_len, blob_len


def decode_body(
    body: bytes | bytearray | memoryview, head_len: int
) -> tuple[dict[str, Any], bytes]:
    try:
        header = json.loads(bytes(body[:head_len]))
    except ValueError as exc:
        raise FrameError(f"bad frame header: {exc}") from exc
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    return header, bytes(body[head_len:])


def read_frame_blocking(fd: int) -> tuple[dict[str, Any], bytes]:
    """Read one whole frame from ``fd`` (the worker side: it has nothing else to do)."""
    prefix = _read_exact(fd, PREFIX_SIZE)
    head_len, blob_len = parse_prefix(prefix)
    return decode_body(_read_exact(fd, head_len + blob_len), head_len)


def _read_exact(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise FrameError("peer closed the pipe", eof=True)
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
