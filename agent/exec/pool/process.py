"""One worker process: spawning it, talking to it, killing and reaping it.

Part of the pool package, the only place that spawns, signals and reaps processes. A worker
is a fresh interpreter (``python -I``, never a fork of the multi-threaded agent) in its own
session, so its process group is its own and a SIGKILL to the group takes grandchildren
with it. :class:`Worker` is used by one thread at a time; ``kill`` is safe from any thread.

Worker states (``WorkerState``), changed only through ``Worker.change_state``::

    STARTING -> GENERIC    booted, no function yet (prestart pool)
    GENERIC  -> LOADING    a function's code and limits were sent
    LOADING  -> IDLE       handler loaded: warm and parked for its function
    IDLE     -> BUSY       checked out by one invocation
    BUSY     -> IDLE       answered and still healthy
    any      -> DEAD       killed (deadline, memory, recycle, close) or died; always reaped
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import resource
import select
import signal
import subprocess
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.errors import (
    EdgeExecutionError,
    MemoryLimitExceeded,
    WorkerCrashed,
)
from agent.exec import pipe

log = logging.getLogger(__name__)

#: The clean base environment of every worker; a function's ``environment`` goes on top.
BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}

_AGENT_ROOT = str(Path(__file__).resolve().parents[3])
# -I: no PYTHONPATH, no user site, no cwd on sys.path. The agent's own root is appended so
# a source checkout works too; an installed agent is found first on the normal path.
_BOOTSTRAP = (
    "import sys; sys.path.append(sys.argv[1]); "
    "from agent.exec.worker import main; main(sys.argv[2:])"
)
_READ_CHUNK = 1 << 16
#: /proc scans per sweep before giving up on a fork bomb (each pass kills what it saw).
_SWEEP_PASSES = 50
#: A dead worker whose peak RSS reached this share of its limit died of memory.
_MEMORY_DEATH_SHARE = 0.9
#: How long a worker whose pipe closed gets to finish exiting before the pool kills it.
_DYING_WAIT_S = 0.1


class WorkerState(enum.Enum):
    STARTING = "starting"
    GENERIC = "generic"
    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


@dataclass(frozen=True)
class WorkerLimits:
    """rlimits besides memory, applied in the worker before user code is loaded."""

    nofile: int = 1024
    fsize_bytes: int = 256 * 1024 * 1024


class _Deadline(Exception):
    pass


class Worker:
    """One worker process and its pipes; used by one thread at a time."""

    def __init__(self, proc: subprocess.Popen[bytes], rfd: int, wfd: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.rfd = rfd
        self.wfd = wfd
        self.state = WorkerState.STARTING
        self.function_id = ""
        self.generation = 0
        self.invocations = 0
        self.memory_limit_kb = 0
        self.accepts_context = False
        #: The uid its function runs as (set at load), or None when functions share one.
        self.uid: int | None = None
        #: Why the pool killed it from outside (the tree's memory), to report that instead
        #: of guessing from how it died.
        self.killed_for: EdgeExecutionError | None = None
        self.sent_state_version = -1
        self.sent_desired_version = -1
        self.exit_status: int | None = None
        #: Who SIGKILLed it when the pool did so while it still ran ("" otherwise): says
        #: whose SIGKILL its wait status shows (see ``pipe.exit_reason``).
        self.killed_by = ""
        self.maxrss_kb = 0
        #: ru_maxrss survives exec: the agent's own peak at spawn time, seen in the worker's.
        self.inherited_maxrss_kb = _own_maxrss_kb()
        #: The worker's peak RSS once its handler was loaded (VmHWM, reported on load).
        self.baseline_rss_kb = 0
        self._kill_lock = threading.Lock()
        self._reader = pipe.FrameReader()
        self._poll = select.poll()
        self._poll.register(rfd, select.POLLIN)
        # Non-blocking: the answer is often there already when our write returns (the
        # worker ran on wake-up), so recv reads first and polls only when it must.
        os.set_blocking(rfd, False)

    def limit_frames(self, max_frame: int) -> None:
        """Refuse (FrameTooLarge, nothing buffered) any frame over ``max_frame`` bytes."""
        self._reader.max_frame = min(max_frame, pipe.MAX_FRAME)

    def change_state(self, new: WorkerState) -> None:
        if log.isEnabledFor(logging.DEBUG):  # twice per invocation: skip the call when off
            log.debug("worker %d: %s -> %s", self.pid, self.state.value, new.value)
        self.state = new

    def send(self, header: Mapping[str, object] | bytes, blob: bytes = b"") -> None:
        try:
            pipe.write_all(self.wfd, pipe.encode_frame(header, blob))
        except OSError as exc:  # EPIPE: it died; the read that follows says how
            raise pipe.FrameError(f"worker {self.pid} pipe closed: {exc}", eof=True) from exc

    def recv(self, deadline: float | None) -> tuple[dict[str, Any], bytes]:
        """One frame, or ``_Deadline`` at the monotonic deadline, or FrameError(eof).

        Reads first (:meth:`try_recv`) and polls only when nothing more is there: the answer
        is often in when our write returns (the worker ran on wake-up)."""
        while (frame := self.try_recv()) is None:
            if deadline is None:
                self._poll.poll()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Deadline
            self._poll.poll(max(1, int(remaining * 1000 + 0.999)))
        return frame

    def try_recv(self) -> tuple[dict[str, Any], bytes] | None:
        """The next frame if all of it is here (non-blocking reads), else None; FrameError
        when the pipe closed or what came is not a frame. For a caller that waits for
        ``rfd`` to be readable itself (the daemon's loop)."""
        while (frame := self._reader.take()) is None:
            try:
                chunk = os.read(self.rfd, _READ_CHUNK)
            except BlockingIOError:
                return None
            if not chunk:
                raise pipe.FrameError(f"worker {self.pid} closed its pipe", eof=True)
            self._reader.feed(chunk)
        return frame

    def signal_kill(self) -> None:
        """SIGKILL the process group only; the thread that owns the worker reaps it.

        Used on a worker another thread is talking to: closing its fds under that thread
        would break its read (or worse, hand it a recycled fd).
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def kill(self, why: str = "the pool") -> None:
        """SIGKILL the whole process group, reap, close the pipes. Idempotent, thread-safe.

        ``why`` names the killer in its exit reason when it was still running.
        """
        with self._kill_lock:
            if self.state is WorkerState.DEAD:
                return
            self._kill_locked(why)

    def _kill_locked(self, why: str) -> None:
        self.change_state(WorkerState.DEAD)
        if not self.killed_by and not self._has_exited():
            self.killed_by = why
        # The group outlives the leader while grandchildren remain, so killing the group
        # first and reaping second never signals a recycled pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._reap()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("worker %d of %s %s", self.pid, self.function_id or "-", self.exit_reason)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # stragglers forked during the reap
        for fd in (self.rfd, self.wfd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def kill_closed(self) -> None:
        """``kill`` a worker whose pipe closed under us: it is exiting, so it gets
        ``_DYING_WAIT_S`` to finish first, and its wait status (and reason) is its own, not
        the pool's SIGKILL."""
        self.wait_exit(_DYING_WAIT_S)
        self.kill("the pool (its pipe had closed)")

    def exited(self) -> bool:
        """Whether it has exited (reaped by Popen if so): a pre-started worker found dead."""
        return self.proc.poll() is not None

    def _has_exited(self) -> bool:
        """Whether it is already dead (a zombie), without reaping it."""
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PID, self.pid, flags) is not None
        except ChildProcessError:
            return True  # reaped already

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for it to exit by itself (after ``load_failed`` it
        does at once), so that ``kill`` reaps its own exit code, not the pool's SIGKILL."""
        deadline = time.monotonic() + timeout
        pause = 0.0005
        while not self._has_exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        return True

    @property
    def exit_reason(self) -> str:
        """How it ended, in words (after ``kill`` has reaped it): ``pipe.exit_reason``."""
        return pipe.exit_reason(self.exit_status, self.killed_by)

    def _reap(self) -> None:
        while True:
            try:
                _, status, rusage = os.wait4(self.pid, 0)
            except ChildProcessError:  # Popen reaped it (poll): its returncode, as a status
                code = self.proc.returncode
                self.exit_status = None if code is None else -code if code < 0 else code << 8
                return
            except InterruptedError:
                continue
            self.exit_status = status
            self.maxrss_kb = int(rusage.ru_maxrss)
            # Tell Popen so it neither warns nor tries to reap the pid again.
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            return

    def death_error(self, function_id: str) -> EdgeExecutionError:
        """Classify a worker that died on its own (after ``kill`` has reaped it).

        Memory: the worker's own exit code EX_MEMORY, or a signal death whose peak RSS grew
        past 90% of memory_mb above what the loaded worker used. ru_maxrss is only the
        worker's own when it exceeds what it inherited from the agent at spawn.
        """
        status = self.exit_status
        own_peak = self.maxrss_kb > self.inherited_maxrss_kb
        grown_kb = self.maxrss_kb - self.baseline_rss_kb
        near_limit = (
            bool(self.memory_limit_kb)
            and own_peak
            and grown_kb >= _MEMORY_DEATH_SHARE * self.memory_limit_kb
        )
        reason = self.exit_reason
        if status is None:
            return WorkerCrashed(f"worker of {function_id} {reason}")
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if near_limit:
                return MemoryLimitExceeded(
                    f"function {function_id} exceeded its memory limit "
                    f"(worker {reason} at {self.maxrss_kb} KiB RSS)"
                )
            return WorkerCrashed(f"worker of {function_id} {reason}", signal=sig)
        code = os.WEXITSTATUS(status)
        if code == pipe.EX_MEMORY:
            return MemoryLimitExceeded(f"function {function_id} exceeded its memory limit")
        return WorkerCrashed(f"worker of {function_id} {reason}", exit_code=code)


class Spawner(Protocol):
    """Where the pool gets its workers and how it kills what they leave behind: every OS call
    the pool makes outside a :class:`Worker`, behind one object a test can fake
    (``testing.spawner.FakeSpawner``)."""

    def spawn(self, *, python: str, codec: str, user: str | None, cwd: str | None) -> Worker:
        """A new worker in state STARTING; it says ``ready`` when booted."""
        ...

    def sweep_uid(self, uid: int, keep_sessions: Collection[int] = ()) -> int:
        """Kill every process of ``uid`` outside ``keep_sessions``; how many."""
        ...

    def kill_session(self, uid: int, session: int) -> int:
        """Kill every process of ``uid`` in ``session``; how many."""
        ...

    def close(self) -> None:
        """No spawn after this (a late one raises RuntimeError)."""
        ...


class ProcessSpawner:
    """The real spawner: worker processes, always forked from one long-lived thread.

    A worker's parent-death signal fires when the *thread* that forked it ends, so a
    short-lived caller thread (local mode) must never be its parent.
    """

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-spawn")

    def spawn(self, *, python: str, codec: str, user: str | None, cwd: str | None) -> Worker:
        return self._thread.submit(spawn, python=python, codec=codec, user=user, cwd=cwd).result()

    def sweep_uid(self, uid: int, keep_sessions: Collection[int] = ()) -> int:
        return sweep_uid(uid, keep_sessions)

    def kill_session(self, uid: int, session: int) -> int:
        return kill_session(uid, session)

    def close(self) -> None:
        self._thread.shutdown(wait=False)


def spawn(*, python: str, codec: str, user: str | None, cwd: str | None) -> Worker:
    """Start a fresh interpreter running agent.exec.worker in its own session (not yet ready)."""
    parent_r, child_w = os.pipe()
    child_r, parent_w = os.pipe()
    pipe_args = (str(child_r), str(child_w), codec)
    try:
        proc = subprocess.Popen(
            # -B: a worker never writes bytecode, so installed code stays exactly as
            # verified (a planted .pyc would run instead of the checked source).
            [python, "-I", "-B", "-c", _BOOTSTRAP, _AGENT_ROOT, *pipe_args, str(os.getpid())],
            stdin=subprocess.DEVNULL,
            pass_fds=(child_r, child_w),
            close_fds=True,
            start_new_session=True,
            env=dict(BASE_ENV),
            cwd=cwd or "/",
            user=user,
            group=_user_group(user),
            extra_groups=[] if user else None,
        )
    except BaseException:
        for fd in (parent_r, parent_w):
            os.close(fd)
        raise
    finally:
        os.close(child_r)
        os.close(child_w)
    return Worker(proc, parent_r, parent_w)


def sweep_uid(uid: int, keep_sessions: Collection[int] = ()) -> int:
    """SIGKILL every process running as ``uid`` outside ``keep_sessions``; how many.

    A function's own uid makes "every process it started" a complete set: a grandchild
    that left the worker's process group with setsid() and a double fork is still that
    uid's. Scans /proc until a pass finds nothing (escapees may fork while we look).
    The caller keeps the sessions of live workers (each worker is its own session leader).
    """
    killed = 0
    for _ in range(_SWEEP_PASSES):
        found = [pid for pid, sid in _processes_of(uid) if sid not in keep_sessions]
        if not found:
            break
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed += len(found)
    if killed:
        log.info("killed %d leftover processes of uid %d", killed, uid)
    return killed


def kill_session(uid: int, session: int) -> int:
    """SIGKILL every process of ``uid`` in ``session`` (its group first); how many."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(session, signal.SIGKILL)
    killed = 0
    for pid, sid in _processes_of(uid):
        if sid == session:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def _processes_of(uid: int) -> list[tuple[int, int]]:
    """(pid, session id) of every process whose real uid is ``uid``."""
    out = []
    for pid, text in proc_statuses():
        try:
            if status_field(text, b"\nUid:") == uid:
                out.append((pid, status_field(text, b"\nNSsid:")))
        except ValueError:
            continue  # a kernel thread or an odd entry
    return out


def proc_statuses() -> Iterator[tuple[int, bytes]]:
    """(pid, /proc/<pid>/status) of every process this one may read.

    The status file (world-readable) rather than the owner of /proc/<pid>: a process that
    changed uid is not dumpable, and its directory is root's.
    """
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status", "rb") as status:
                    yield int(name), status.read()
            except OSError:
                continue  # gone meanwhile


def status_field(text: bytes, key: bytes) -> int:
    """The first number after ``key`` (``b"\\nUid:"``...) in a status text; ValueError if absent."""
    start = text.index(key) + len(key)
    return int(text[start : text.index(b"\n", start)].split()[0])


def _own_maxrss_kb() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _user_group(user: str | None) -> int | None:
    if not user:
        return None
    import pwd

    return pwd.getpwnam(user).pw_gid
