"""The agent <-> worker pipe: its framing and its whole vocabulary, for both sides.

Pure (stdlib only): :mod:`agent.exec.worker` imports it at start-up, :mod:`agent.exec.pool` uses the
same names. (The MQTT contract is :mod:`agent.contract.protocol`; this is only the local pipe.)

Messages (a frame's header; ``blob`` is the frame's opaque payload)::

    op           sender  fields                                     blob
    -----------  ------  -----------------------------------------  ----------------------
    ready        worker  pid                                        -
    load         agent   function_id codec kind path entrypoint     cloudpickled handler
                         environment memory_bytes rlimits{nofile     (kind "pickle")
                         fsize nproc} sys_path uid gid max_result
                         max_result_source [cwd]
    loaded       worker  context (takes a context?) rss_kb          -
    load_failed  worker  error{type message traceback}; then it     -
                         exits EX_LOAD_FAILED
    invoke       agent   request_id [deadline state state_version   pickled (args, kwargs),
                         desired desired_version request_json]      or with request_json
                         (state, desired: only when changed since   the invoke request's
                         this worker's last; no context: the hot-   JSON as it came (the
                         path header I<id>, or J<id> with           handler's argument is
                         request_json)                              its payload)
    result       worker  ok rss_kb; ok: [changes checked read_all]; result (JSON or pickle);
                         not ok: error{type message [exc_module      not ok: the pickled
                         exc_name traceback]}; type memory_exceeded  exception or nothing
                         is followed by exit EX_MEMORY; ok without
                         writes: the hot-path header R<rss_kb>
    exit         agent   - (the worker exits 0; the pool kills and   -
                         reaps instead, so it is not sent today)

``ready`` comes once when the interpreter is up, then one ``load`` (answered ``loaded`` or
``load_failed``), then ``invoke`` frames, each answered by one ``result``.

Worker exit codes (:data:`EXIT_CODES`). The pool reaps every worker and turns its wait
status into words with :func:`exit_reason` (the ``WorkerCrashed`` a caller gets, the log)::

    EX_OK            0  told to ``exit``, or the agent closed the pipe
    EX_MEMORY       88  ran out of memory_mb (after a ``memory_exceeded`` result if it could)
    EX_PROTOCOL     89  the agent sent a frame or ``op`` it could not read
    EX_LOAD_FAILED  90  the handler could not be loaded (after ``load_failed``)
    EX_ORPHANED     91  the agent was gone before the worker tied its life to it

Any other code is the handler's own (``os._exit``) or an uncaught error in the worker.

Framing: a frame is ``!II`` (header length, blob length), a JSON header, then the blob::

    +--------+--------+----------------+-----------------+
    | u32 hl | u32 bl | header (JSON)  | blob (bytes)    |
    +--------+--------+----------------+-----------------+

Headers are JSON so that the agent never has to unpickle what an untrusted worker says:
the blob (a pickle) is only read by a parent that runs its own user's code (local mode).

The two frames on the hot path skip JSON (about 8 us per round trip here): an invocation's
header is ``I`` + the request id (``J`` + it when the blob is the request's JSON), a
successful result's is ``R`` + the worker's peak RSS in KiB as ASCII digits.
:func:`decode_body` returns the same dicts for them.

``request_json`` (the daemon, JSON codec): the blob is the invoke request exactly as it came
from MQTT, already checked by the agent (``contract.invoke.decode_invoke``: UTF-8, one JSON
object, no NaN or Infinity, a ``payload``); the worker parses it the same way and calls the
handler with its ``payload``. The payload is so parsed once on each side and never pickled.
"""

from __future__ import annotations

import json
import os
import signal
import struct

TYPE_CHECKING = False  # the worker imports this: no typing at run time
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, Final

_PREFIX = struct.Struct("!II")
_pack = _PREFIX.pack
_unpack_from = _PREFIX.unpack_from
PREFIX_SIZE = _PREFIX.size
#: Upper bound on one frame; a worker claiming more is treated as broken.
MAX_FRAME = 256 * 1024 * 1024

# -- the vocabulary ---------------------------------------------------------------------------

# ops: what a frame's header is (its "op" field)
READY: Final = "ready"
LOAD: Final = "load"
LOADED: Final = "loaded"
LOAD_FAILED: Final = "load_failed"
INVOKE: Final = "invoke"
RESULT: Final = "result"
EXIT: Final = "exit"

# the worker's exit codes (billiard/gunicorn habit); the pool reads each one on reap
EX_OK: Final = 0
EX_MEMORY: Final = 88
EX_PROTOCOL: Final = 89
EX_LOAD_FAILED: Final = 90
EX_ORPHANED: Final = 91

#: code -> (name, what it means), for :func:`exit_reason`.
EXIT_CODES: dict[int, tuple[str, str]] = {
    EX_OK: ("EX_OK", "told to exit, or the agent closed its pipe"),
    EX_MEMORY: ("EX_MEMORY", "it ran out of memory_mb"),
    EX_PROTOCOL: ("EX_PROTOCOL", "a pipe message from the agent it could not parse"),
    EX_LOAD_FAILED: ("EX_LOAD_FAILED", "its handler could not be loaded"),
    EX_ORPHANED: ("EX_ORPHANED", "the agent was gone before the worker could tie its life to it"),
}

if TYPE_CHECKING:  # the messages' shapes, for mypy; at run time they are plain dicts
    from typing import Literal, NotRequired, TypedDict

    class ReadyMsg(TypedDict):
        op: Literal["ready"]
        pid: int

    class RLimits(TypedDict):
        nofile: int
        fsize: int
        nproc: int  # per uid: 0 unless the function has a uid of its own

    class LoadMsg(TypedDict):
        op: Literal["load"]
        function_id: str
        codec: str  # "pickle" (local mode) or "json" (daemon)
        kind: str  # "pickle": the blob is the handler; "package": path + entrypoint
        path: str
        entrypoint: str
        environment: dict[str, str]
        memory_bytes: int
        rlimits: RLimits
        sys_path: list[str]
        uid: int | None
        gid: int | None
        max_result: int  # bytes; 0: no limit
        max_result_source: str  # the config key that sets it, for the error
        cwd: NotRequired[str]

    class LoadedMsg(TypedDict):
        op: Literal["loaded"]
        context: bool
        rss_kb: int

    class ErrorInfo(TypedDict):
        type: str  # the wire error type: handler_error, memory_exceeded
        message: str
        traceback: NotRequired[str]
        exc_module: NotRequired[str]
        exc_name: NotRequired[str]

    class LoadFailedMsg(TypedDict):
        op: Literal["load_failed"]
        error: ErrorInfo

    class InvokeMsg(TypedDict):
        op: Literal["invoke"]
        request_id: str
        deadline: NotRequired[float]  # monotonic, for context.deadline
        state: NotRequired[dict[str, Any]]
        state_version: NotRequired[int]
        desired: NotRequired[dict[str, Any]]
        desired_version: NotRequired[int]
        request_json: NotRequired[bool]  # the blob is the invoke request's JSON

    class ResultMsg(TypedDict):
        op: Literal["result"]
        ok: bool
        rss_kb: int
        error: NotRequired[ErrorInfo]  # when not ok
        changes: NotRequired[dict[str, Any]]  # the handler's state writes (None deletes)
        checked: NotRequired[list[str]]  # keys that must be unchanged to apply them
        read_all: NotRequired[bool]  # it listed the whole state: any change conflicts


def ready(pid: int) -> ReadyMsg:
    return {"op": READY, "pid": pid}


def load(
    *,
    function_id: str,
    codec: str,
    kind: str,
    path: str,
    entrypoint: str,
    environment: dict[str, str],
    memory_bytes: int,
    rlimits: RLimits,
    sys_path: list[str],
    uid: int | None,
    gid: int | None,
    max_result: int,
    max_result_source: str,
) -> LoadMsg:
    return {
        "op": LOAD,
        "function_id": function_id,
        "codec": codec,
        "kind": kind,
        "path": path,
        "entrypoint": entrypoint,
        "environment": environment,
        "memory_bytes": memory_bytes,
        "rlimits": rlimits,
        "sys_path": sys_path,
        "uid": uid,
        "gid": gid,
        "max_result": max_result,
        "max_result_source": max_result_source,
    }


def loaded(context: bool, rss_kb: int) -> LoadedMsg:
    return {"op": LOADED, "context": context, "rss_kb": rss_kb}


def load_failed(error: ErrorInfo) -> LoadFailedMsg:
    return {"op": LOAD_FAILED, "error": error}


def invoke(request_id: str, deadline: float) -> InvokeMsg:
    """An invoke with a context (the caller adds state and desired when they changed);
    without one the pool sends the hot-path :func:`invoke_header` instead."""
    return {"op": INVOKE, "request_id": request_id, "deadline": deadline}


def result(rss_kb: int) -> ResultMsg:
    """A successful result with room for the state writes; without any the worker sends
    the hot-path :func:`result_header` instead."""
    return {"op": RESULT, "ok": True, "rss_kb": rss_kb}


def error_result(error: ErrorInfo, rss_kb: int) -> ResultMsg:
    return {"op": RESULT, "ok": False, "error": error, "rss_kb": rss_kb}


def exit_reason(status: int | None, killed_by: str = "") -> str:
    """A worker's wait status in words: "exited with EX_PROTOCOL (89: ...)", "died from
    SIGSEGV (11)", "was killed by SIGKILL (9) from the pool at the deadline".

    ``killed_by`` says who sent the SIGKILL when the pool knows it did (the worker was
    still running when it was killed); a SIGKILL nobody here sent is said to be so.
    """
    if status is None:
        return "vanished (no exit status: reaped elsewhere)"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGKILL:
            if killed_by:
                return f"was killed by {name} ({sig}) from {killed_by}"
            return f"died from {name} ({sig}), not sent by the pool (the OOM killer? an operator?)"
        return f"died from {name} ({sig})"
    code = os.waitstatus_to_exitcode(status)
    if code == EX_OK:
        return f"exited normally (0: {EXIT_CODES[EX_OK][1]})"
    if code in EXIT_CODES:
        name, meaning = EXIT_CODES[code]
        return f"exited with {name} ({code}: {meaning})"
    return (
        f"exited with code {code} (not a worker exit code: the handler's own os._exit, "
        f"or an error the worker could not report)"
    )


class FrameError(Exception):
    """The peer sent something that is not a frame, or closed the pipe (``eof``)."""

    def __init__(self, message: str, *, eof: bool = False) -> None:
        super().__init__(message)
        self.eof = eof


def encode_frame(header: Mapping[str, object] | bytes, blob: bytes = b"") -> bytes:
    """A frame; ``header`` is a JSON-able message, or the raw bytes of a hot-path header."""
    if isinstance(header, bytes):
        head = header
    else:
        head = json.dumps(header, separators=(",", ":")).encode()
    return _pack(len(head), len(blob)) + head + blob


def invoke_header(request_id: str, request_json: bool = False) -> bytes:
    """The hot-path invoke header: ``I`` + the request id, or ``J`` + it when the blob is
    the invoke request's own JSON (the handler's one argument is its ``payload``)."""
    return (b"J" if request_json else b"I") + request_id.encode()


def result_header(rss_kb: int) -> bytes:
    return b"R%d" % rss_kb


def write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)  # a pipe takes a small frame in one write
    if written == len(data):
        return
    view = memoryview(data)[written:]
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
    head_len, blob_len = _unpack_from(buf)
    size = head_len + blob_len
    if size > max_frame or size > MAX_FRAME:
        _refuse(size, max_frame)
    return head_len, blob_len


def _refuse(size: int, max_frame: int) -> None:
    """Raise what a frame of ``size`` bytes means to a reader taking ``max_frame``."""
    if size > MAX_FRAME:  # no frame is that big: the peer is not speaking this protocol
        raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME}: not a frame")
    raise FrameTooLarge(size, max_frame)


def decode_body(
    body: bytes | bytearray | memoryview, head_len: int
) -> tuple[dict[str, Any], bytes]:
    """A frame's message and blob from its body (the frame without its prefix)."""
    if type(body) is bytes:
        return _header(body, 0, head_len), body[head_len:]
    view = memoryview(body)
    return _header(bytes(view[:head_len]), 0, head_len), bytes(view[head_len:])


def _header(buf: bytes, start: int, end: int) -> dict[str, Any]:
    """The message whose header is ``buf[start:end]``: a hot-path header, or a JSON object
    (parsed strictly: anything else is a FrameError)."""
    try:
        if end > start:
            kind = buf[start]
            if kind == 0x52:  # b"R": the hot-path result
                return {"op": RESULT, "ok": True, "rss_kb": int(buf[start + 1 : end] or 0)}
            if kind == 0x49:  # b"I": the hot-path invoke
                return {"op": INVOKE, "request_id": buf[start + 1 : end].decode()}
            if kind == 0x4A:  # b"J": the hot-path invoke of the request's own JSON
                rid = buf[start + 1 : end].decode()
                return {"op": INVOKE, "request_id": rid, "request_json": True}
        header = json.loads(buf[start:end])
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise FrameError(f"bad frame header: {exc}") from exc
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    return header


class FrameReader:
    """Frames out of a byte stream: ``feed`` what was read, ``take`` whole frames.

    One read usually brings exactly one whole frame, so a round trip costs one read syscall
    per side, and that read's bytes are kept as they are: the frame is sliced out of them,
    with no buffer to append to and trim. Only a frame split across reads is gathered in a
    bytearray. The prefix is checked (FrameTooLarge) as soon as it has arrived, before any
    more of the frame is buffered.
    """

    __slots__ = ("_buf", "_limit", "_pos")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        #: bytes: one read's chunk as it came, taken up to ``_pos``; bytearray: a frame
        #: being gathered from several reads (``_pos`` is 0).
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._limit = min(max_frame, MAX_FRAME)

    @property
    def max_frame(self) -> int:
        """The largest frame taken (header + blob bytes); never above MAX_FRAME."""
        return self._limit

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._limit = min(value, MAX_FRAME)

    def feed(self, chunk: bytes) -> None:
        buf = self._buf
        if isinstance(buf, bytearray):
            buf += chunk
        elif self._pos == len(buf) and type(chunk) is bytes:
            self._buf = chunk  # the usual case: nothing pending, keep the read as it is
            self._pos = 0
        else:  # a frame continues in this chunk: gather it
            gathered = bytearray(memoryview(buf)[self._pos :])
            gathered += chunk
            self._buf = gathered
            self._pos = 0

    def take(self) -> tuple[dict[str, Any], bytes] | None:
        """The next whole frame, or None until more bytes arrive."""
        buf, pos = self._buf, self._pos
        size = len(buf) - pos
        if size < PREFIX_SIZE:
            return None
        head_len, blob_len = _unpack_from(buf, pos)
        if head_len + blob_len > self._limit:
            _refuse(head_len + blob_len, self._limit)
        if size < PREFIX_SIZE + head_len + blob_len:
            return None
        start = pos + PREFIX_SIZE
        mid = start + head_len
        end = mid + blob_len
        if isinstance(buf, bytes):  # never a subclass: feed keeps only exact bytes
            header = _header(buf, start, mid)  # a bad header leaves the frame unread
            if end == len(buf):  # drained: drop the chunk
                self._buf = b""
                self._pos = 0
            else:
                self._pos = end
            return header, buf[mid:end]
        view = memoryview(buf)
        head, blob = bytes(view[start:mid]), bytes(view[mid:end])
        view.release()  # before the bytearray is resized
        header = _header(head, 0, head_len)
        del buf[:end]
        if not buf:  # back to keeping reads as they come
            self._buf = b""
        return header, blob

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
