"""Framing of the parent <-> worker pipe protocol. Pure: stdlib only, shared by both sides.

A frame is ``!II`` (header length, blob length), a JSON header, then an opaque blob::

    +--------+--------+----------------+-----------------+
    | u32 hl | u32 bl | header (JSON)  | blob (bytes)    |
    +--------+--------+----------------+-----------------+

Headers are JSON so that the agent never has to unpickle what an untrusted worker says:
the blob (a pickle) is only read by a parent that runs its own user's code (local mode).

The two frames on the hot path skip JSON (about 8 us per round trip here): an invocation's
header is ``I`` + the request id, a successful result's is ``R`` + the worker's peak RSS
in KiB as ASCII digits. :func:`decode_body` returns the same dicts for them.
"""

from __future__ import annotations

import json
import os
import struct

TYPE_CHECKING = False  # the worker imports this: no typing at run time
if TYPE_CHECKING:
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


def encode_frame(header: dict[str, Any] | bytes, blob: bytes = b"") -> bytes:
    """A frame; ``header`` is a JSON-able dict, or the raw bytes of a hot-path header."""
    if isinstance(header, bytes):
        head = header
    else:
        head = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(len(head), len(blob)) + head + blob


def invoke_header(request_id: str) -> bytes:
    return b"I" + request_id.encode()


def result_header(rss_kb: int) -> bytes:
    return b"R%d" % rss_kb


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FrameTooLarge(FrameError):
    """A frame announced more bytes than the reader accepts; nothing of it was buffered."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


def parse_prefix(buf: bytes | bytearray, max_frame: int = MAX_FRAME) -> tuple[int, int]:
    """Header and blob lengths from the first PREFIX_SIZE bytes of ``buf``.

    Raises FrameTooLarge as soon as the prefix says the frame is over ``max_frame``: a
    reader checks this before it buffers the body, so a huge frame never costs memory.
    """
    head_len, blob_len = _PREFIX.unpack_from(buf)
    size = head_len + blob_len
    if size > MAX_FRAME:  # no frame is that big: the peer is not speaking this protocol
        raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME}: not a frame")
    if size > max_frame:
        raise FrameTooLarge(size, max_frame)
    return head_len, blob_len


def decode_body(
    body: bytes | bytearray | memoryview, head_len: int
) -> tuple[dict[str, Any], bytes]:
    head = bytes(body[:head_len])
    blob = bytes(body[head_len:])
    try:
        if head[:1] == b"R":
            return {"op": "result", "ok": True, "rss_kb": int(head[1:] or 0)}, blob
        if head[:1] == b"I":
            return {"op": "invoke", "request_id": head[1:].decode()}, blob
        header = json.loads(head)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise FrameError(f"bad frame header: {exc}") from exc
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    return header, blob


class FrameReader:
    """Frames out of a byte stream: ``feed`` what was read, ``take`` whole frames.

    One read usually brings a whole frame, so a round trip costs one read syscall per side.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = min(max_frame, MAX_FRAME)

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk

    def take(self) -> tuple[dict[str, Any], bytes] | None:
        """The next whole frame, or None until more bytes arrive."""
        if len(self._buf) < PREFIX_SIZE:
            return None
        head_len, blob_len = parse_prefix(self._buf, self.max_frame)
        end = PREFIX_SIZE + head_len + blob_len
        if len(self._buf) < end:
            return None
        frame = decode_body(memoryview(self._buf)[PREFIX_SIZE:end], head_len)
        del self._buf[:end]
        return frame

    def read_blocking(self, fd: int) -> tuple[dict[str, Any], bytes]:
        """The next frame from a blocking ``fd`` (the worker side: it has nothing else to do)."""
        while (frame := self.take()) is None:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise FrameError("peer closed the pipe", eof=True)
            self.feed(chunk)
        return frame


def read_frame_blocking(fd: int) -> tuple[dict[str, Any], bytes]:
    """Read exactly one whole frame from ``fd``, nothing past it (for tests and tools)."""
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
