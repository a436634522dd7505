"""The worker side: a fresh interpreter that loads one function and runs its invocations.

Started by :mod:`agent.exec.pool` as ``python -I -c <bootstrap> <read fd> <write fd>`` in its own
session. It talks to the agent only through the two pipe fds (framing, messages and exit
codes in :mod:`agent.exec.pipe`); stdout is pointed at stderr so a handler's ``print`` can never
corrupt the channel.

Limits and identity are applied here *before* user code is loaded (rlimits only go down):
with a ``uid`` in the load message the worker becomes that function's user, then drops every
capability it inherited from the agent (an agent under systemd holds CAP_SETUID, CAP_SETGID
and CAP_KILL as ambient capabilities, which would otherwise survive into user code) and sets
no_new_privs, and it refuses to load if any capability is left. They are only the first
line: the parent enforces the deadline with SIGKILL to this process group and classifies
the death itself. This module must never import anything heavy at start-up
beyond what a cold start needs (pickle, cloudpickle), and never talks to the network.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import resource
import signal
import sys
import threading
import time
import traceback

from agent.exec import pipe
from agent.exec.context import InvocationContext

TYPE_CHECKING = False  # typing and inspect cost ~50 ms of worker start-up: not at run time
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

#: Stack of each thread a handler starts (Python's threading): 1 MiB, plenty for
#: Python code (a frame costs well under a kilobyte of C stack in 3.11).
_THREAD_STACK_BYTES = 1 << 20

#: Released on MemoryError so the worker has room to report it.
_RESERVE_BYTES = 1 << 20

#: A successful invocation reads the worker's RSS only when this long (s) has passed since
#: the last read: back-to-back sub-millisecond calls skip the ~1.4 us of the read (9% of a
#: warm local invoke). A call that runs longer, or the first after a pause, always reads.
RSS_READ_EVERY_S = 0.001


def read_status_kb(field: bytes, fd: int | None = None) -> int:
    """One ``kB`` field of /proc/self/status (VmData, VmHWM, ...); 0 when unavailable.

    With ``fd`` (kept open by the caller) it costs one pread: this runs per invocation.
    """
    try:
        if fd is None:
            with open("/proc/self/status", "rb") as status:
                data = status.read()
        else:
            data = os.pread(fd, 8192, 0)
    except OSError:
        return 0
    start = data.find(field + b":")
    if start < 0:
        return 0
    end = data.find(b"\n", start)
    return int(data[start + len(field) + 1 : end].split()[0])


def read_vmdata_bytes() -> int:
    """The process's current data segment size (what RLIMIT_DATA counts)."""
    return read_status_kb(b"VmData") * 1024


def _set_limit(which: int, value: int) -> None:
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def apply_limits(header: pipe.LoadMsg) -> int:
    """Apply the load message's rlimits; returns the RLIMIT_DATA set (0 = none)."""
    _set_limit(resource.RLIMIT_CORE, 0)
    rlimits = header["rlimits"]
    for value, which in (
        (rlimits["nofile"], resource.RLIMIT_NOFILE),
        (rlimits["fsize"], resource.RLIMIT_FSIZE),
        (rlimits["nproc"], resource.RLIMIT_NPROC),  # per uid: only with the function's own uid
    ):
        if value > 0:
            _set_limit(which, value)
    memory_bytes = int(header["memory_bytes"])
    if memory_bytes <= 0:
        return 0
    # RLIMIT_DATA counts private writable memory (heap, anonymous mmaps, thread stacks) but
    # not shared libraries or file-backed code, so on top of what this interpreter already
    # uses the handler gets what it asked for. See docs/runtime.md for the measurements.
    limit = read_vmdata_bytes() + memory_bytes + _RESERVE_BYTES
    _set_limit(resource.RLIMIT_DATA, limit)
    return limit


def become(uid: int | None, gid: int | None) -> None:
    """Take the function's identity (if given) and give up every privilege, for good.

    Raises PermissionError when something is left: user code must never start with more.
    """
    import ctypes

    if gid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
    if uid is not None:
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid):
            raise PermissionError(f"could not become uid {uid}: {os.getresuid()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if os.geteuid() != 0:
        # A non-root process keeps permitted/ambient capabilities across setuid: clear them.
        libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()
        if libc.capset(header, data) != 0:
            raise PermissionError(f"capset failed: {os.strerror(ctypes.get_errno())}")
        left = capabilities()
        if any(left.values()):
            raise PermissionError(f"capabilities left after dropping them: {left}")


def capabilities() -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapAmb of this process, from /proc/self/status."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/self/status", "rb") as status:
        for line in status:
            name, _, value = line.partition(b":")
            if name in (b"CapInh", b"CapPrm", b"CapEff", b"CapAmb"):
                out[name.decode()] = int(value.strip(), 16)
    return out


def resolve_entrypoint(path: str, entrypoint: str) -> Callable[..., Any]:
    module_name, _, attr_path = entrypoint.partition(":")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    target: Any = importlib.import_module(module_name)
    if path:  # a bundle: the entrypoint's module must be the bundle's own file
        origin = os.path.realpath(getattr(target, "__file__", None) or "")
        if not origin.startswith(os.path.realpath(path) + os.sep):
            raise ImportError(
                f"entrypoint {entrypoint}: module {module_name!r} was loaded from "
                f"{origin or 'the interpreter itself'}, not from the bundle {path}"
            )
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    if not callable(target):
        raise TypeError(f"entrypoint {entrypoint} is not callable")
    return target  # type: ignore[no-any-return]


def context_mode(handler: Callable[..., Any], codec: str) -> str:
    """How the handler takes its :class:`~agent.exec.context.InvocationContext`, if at all.

    ``"keyword"``: it has a parameter named ``context``. ``"positional"``: a daemon handler
    (JSON codec) with a second required positional parameter, ``handler(event, ctx)``.
    ``""``: it takes none. Local-mode handlers need the name: ``f(a, b)`` there means two
    arguments, as in the seed.
    """
    import inspect

    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):
        return ""
    if any(p.name == "context" and p.kind is not p.VAR_POSITIONAL for p in params):
        return "keyword"
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return "positional" if codec == "json" and len(positional) >= 2 else ""


class WorkerMain:
    """The worker's loop: load once, then answer invoke frames until told to exit."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.handler: Callable[..., Any] | None = None
        self.codec = "pickle"
        self.function_id = ""
        self.memory_mb = 0
        self.reserve: bytearray | None = None
        self.statm_fd: int | None = None
        self.context_mode = ""
        #: The synced state and desired state as last sent by the agent (version, data).
        self.state: tuple[int, dict[str, Any]] = (0, {})
        self.desired: tuple[int, dict[str, Any]] = (0, {})
        self.page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
        self.max_result = 0
        self.max_result_source = ""
        self.parent = 0  # the agent's pid (main sets it)
        self.peak_seen_kb = 0
        self.rss_read_at = -RSS_READ_EVERY_S  # time.monotonic() of the last read

    def send(self, header: Mapping[str, object] | bytes, blob: bytes = b"") -> None:
        pipe.write_all(self.wfd, pipe.encode_frame(header, blob))

    def run(self) -> int:
        """Answer frames until told to stop; the exit code (see :mod:`agent.exec.pipe`)."""
        self.send(pipe.ready(os.getpid()))
        reader = pipe.FrameReader()
        header: Any  # a message of agent.exec.pipe, told apart by its op
        while True:
            try:
                header, blob = reader.read_blocking(self.rfd)
            except pipe.FrameError as exc:
                return pipe.EX_OK if exc.eof else pipe.EX_PROTOCOL
            op = header.get("op")
            if op == pipe.INVOKE:
                code = self.invoke(header, blob)
                if code is not None:
                    return code
            elif op == pipe.LOAD:
                if not self.load(header, blob):
                    return pipe.EX_LOAD_FAILED
            elif op == pipe.EXIT:
                return pipe.EX_OK
            else:
                return pipe.EX_PROTOCOL

    def load(self, header: pipe.LoadMsg, blob: bytes) -> bool:
        try:
            self.function_id = str(header["function_id"])
            self.codec = str(header["codec"])
            self.memory_mb = int(header["memory_bytes"]) >> 20
            self.max_result = int(header["max_result"])
            self.max_result_source = str(header["max_result_source"])
            os.environ.update({str(k): str(v) for k, v in header["environment"].items()})
            for entry in header["sys_path"]:
                if entry not in sys.path:
                    sys.path.append(entry)
            if header.get("cwd"):
                os.chdir(header["cwd"])
            apply_limits(header)
            # Thread stacks are private mappings that RLIMIT_DATA counts in full; at the
            # default (RLIMIT_STACK, 8 MiB) memory_mb 64 allowed 7 idle threads.
            threading.stack_size(_THREAD_STACK_BYTES)
            uid, gid = header["uid"], header["gid"]
            become(None if uid is None else int(uid), None if gid is None else int(gid))
            die_with(self.parent)
            self.reserve = bytearray(_RESERVE_BYTES)
            if header["kind"] == "package":
                self.handler = resolve_entrypoint(str(header["path"]), str(header["entrypoint"]))
            else:
                self.handler = pickle.loads(blob)
                if not callable(self.handler):
                    raise TypeError(f"handler is not callable: {self.handler!r}")
            self.context_mode = context_mode(self.handler, self.codec)
        except BaseException as exc:
            kind = "memory_exceeded" if isinstance(exc, MemoryError) else "handler_error"
            self.reserve = None
            self.send(
                pipe.load_failed(
                    {
                        "type": kind,
                        "message": f"failed to load handler: {type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(limit=20),
                    }
                )
            )
            return False
        with contextlib.suppress(OSError):
            self.statm_fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        self.peak_seen_kb = read_status_kb(b"VmHWM")
        self.send(pipe.loaded(bool(self.context_mode), self.peak_seen_kb))
        return True

    def invoke(self, header: pipe.InvokeMsg, blob: bytes) -> int | None:
        """Run one invocation and answer it; returns an exit code when the worker must die."""
        if self.handler is None:  # an invoke before a load
            return pipe.EX_PROTOCOL
        context = None
        try:
            args: tuple[Any, ...]
            kwargs: dict[str, Any]
            if header.get("request_json"):  # the request as the agent checked it
                args, kwargs = (json.loads(blob.decode("utf-8"))["payload"],), {}
            else:
                args, kwargs = pickle.loads(blob)
            if self.context_mode:
                context = self.make_context(header)
                if self.context_mode == "keyword":
                    kwargs = {**kwargs, "context": context}
                else:
                    args = (*args, context)
            result = self.handler(*args, **kwargs)
            out = self.encode_result(result)
            del result
            if self.max_result and len(out) > self.max_result:
                source = f" ({self.max_result_source})" if self.max_result_source else ""
                raise ValueError(
                    f"the result is {len(out)} bytes, over the limit of {self.max_result}{source}"
                )
        except MemoryError:
            self.reserve = None  # room to report
            self.send(
                pipe.error_result(
                    {
                        "type": "memory_exceeded",
                        "message": f"function {self.function_id} exceeded memory_mb="
                        f"{self.memory_mb} (MemoryError)",
                    },
                    self.peak_kb(),
                )
            )
            return pipe.EX_MEMORY
        except BaseException as exc:  # handlers may raise SystemExit, KeyboardInterrupt, ...
            error, err = self.encode_error(exc)
            self.send(pipe.error_result(error, self.peak_kb()), err)
            return None
        if context is not None and context.state.writes:
            # The write set travels back with the result, with the keys the agent must find
            # unchanged since this invocation's snapshot to apply it (atomically).
            keys, read_all = context.state.check_set()
            reply = pipe.result(self.peak_kb(fresh=False))
            reply["changes"] = context.state.writes
            reply["checked"] = keys
            if read_all:
                reply["read_all"] = True
            self.send(reply, out)
        else:
            self.send(pipe.result_header(self.peak_kb(fresh=False)), out)
        return None

    def make_context(self, header: pipe.InvokeMsg) -> InvocationContext:
        """The handler's context; the agent sends state and desired only when they changed."""
        if "state" in header:
            self.state = (int(header["state_version"]), header["state"])
        if "desired" in header:
            self.desired = (int(header["desired_version"]), header["desired"])
        return InvocationContext(
            function_id=self.function_id,
            request_id=str(header["request_id"]),
            deadline=float(header.get("deadline", time.monotonic() + 3600)),
            state=self.state[1],
            state_version=self.state[0],
            desired=self.desired[1],
            desired_version=self.desired[0],
        )

    def peak_kb(self, *, fresh: bool = True) -> int:
        """This worker's peak RSS as far as cheaply known (runs after every invocation).

        The highest RSS seen at the end of an invocation (/proc/self/statm, one pread of
        ~1.4 us) or at load (VmHWM). VmHWM itself costs ~13 us to read, and ru_maxrss is
        useless here: it survives exec, so it starts at the agent's own peak.

        ``fresh=False`` (a success): read only if :data:`RSS_READ_EVERY_S` has passed since
        the last read, else report the peak seen so far. What a call shorter than that
        holds on to is seen by the next call made after it (statm at the end of a call
        never saw what a handler freed before returning either).
        """
        if self.statm_fd is not None:
            now = time.monotonic()
            if not fresh and now - self.rss_read_at < RSS_READ_EVERY_S:
                return self.peak_seen_kb
            self.rss_read_at = now
            try:
                rss_kb = int(os.pread(self.statm_fd, 128, 0).split()[1]) * self.page_kb
            except (OSError, ValueError, IndexError):
                return self.peak_seen_kb
            if rss_kb > self.peak_seen_kb:
                self.peak_seen_kb = rss_kb
        return self.peak_seen_kb

    def encode_result(self, result: Any) -> bytes:
        """The result's bytes: JSON (daemon) or a pickle (local mode), in the frame's blob."""
        if self.codec == "json":
            # As the reply writes it (agent.contract.fields.dumps): the agent frames these
            # bytes into the reply as they are, after checking they are one JSON value.
            try:
                try:
                    text = json.dumps(
                        result, separators=(",", ":"), ensure_ascii=False, allow_nan=False
                    )
                    return text.encode()
                except UnicodeEncodeError:  # lone surrogates: \u escapes instead
                    return json.dumps(result, separators=(",", ":"), allow_nan=False).encode()
            except (TypeError, ValueError, RecursionError) as exc:
                raise TypeError(f"handler result is not JSON-serialisable: {exc}") from exc
        try:
            return _dumps(result)
        except Exception as exc:
            raise TypeError(f"handler result cannot be pickled: {exc}") from exc

    def encode_error(self, exc: BaseException) -> tuple[pipe.ErrorInfo, bytes]:
        """The ``error`` of a failed result, and its blob (the pickled exception, or b"")."""
        cls = type(exc)
        error: pipe.ErrorInfo = {
            "type": "handler_error",
            "message": str(exc),
            "exc_module": cls.__module__,
            "exc_name": cls.__qualname__,
            "traceback": "".join(traceback.format_exception(exc, limit=20)),
        }
        blob = b""
        if self.codec == "pickle":
            try:
                blob = _dumps(exc)
            except Exception:
                blob = b""
        return error, blob


def _dumps(value: Any) -> bytes:
    """Pickle by reference where possible; classes of the user's ``__main__`` (which came
    here by value) only pickle by value, with cloudpickle."""
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        import cloudpickle

        return bytes(cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def die_with(parent: int) -> None:
    """SIGKILL this worker when the thread that spawned it (the pool's spawner) ends: the
    agent's death by any path, ``kill -9`` included, takes its workers with it, so a
    redelivered invocation never meets a handler still running from before the crash.

    The kernel clears this on a change of uid, so :meth:`WorkerMain.load` arms it again.
    """
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent and os.getppid() != parent:  # it died before we armed it
        os._exit(pipe.EX_ORPHANED)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    rfd, wfd = int(args[0]), int(args[1])
    codec = args[2] if len(args) > 2 else "pickle"
    parent = int(args[3]) if len(args) > 3 else 0
    die_with(parent)
    os.dup2(2, 1)  # print() in a handler goes to the log, never into the pipe
    if codec == "pickle":  # local mode ships lambdas and closures: pre-import (~20 ms)
        with contextlib.suppress(ImportError):
            import cloudpickle  # noqa: F401
    worker = WorkerMain(rfd, wfd)
    worker.parent = parent
    code = worker.run()
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
