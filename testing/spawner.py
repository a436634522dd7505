"""A fake spawner for :class:`agent.exec.pool.WorkerPool`: workers without processes.

``WorkerPool(spawner=FakeSpawner())`` runs the pool's allocation state machine (slots,
queueing, wake-ups, load backoff, prestart, recycling, close) against scripted in-memory
workers, so a test can drive it fast and exactly. Each :class:`FakeWorker` answers the
pool's pipe messages the way its :class:`Script` says:

    READY                 boots, loads, answers each invocation with its first argument
    LOAD_FAILS            its handler cannot load (``load_failed``, a HandlerError)
    CRASH_WHILE_LOADING   dies (SIGKILL from outside) when told to load
    HANG                  loads, then never answers an invocation (the pool's deadline)

Replies can be held back on named gates, opened by the test (:meth:`FakeSpawner.open`): a
script's ``load_gate`` holds its ``loaded`` reply, an invocation's ``gate=`` keyword
argument holds its result. A held worker is a busy worker, for as long as the test likes.

Owns no process, no fd and no thread; never sleeps (waits are on a condition with the
pool's own deadlines). Only for tests and benchmarks: nothing under ``agent/`` imports it.
"""

from __future__ import annotations

import itertools
import json
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent.exec import pipe
from agent.exec.pool.process import Worker, WorkerState, _Deadline

__all__ = [
    "CRASH_WHILE_LOADING",
    "HANG",
    "LOAD_ERROR",
    "LOAD_FAILS",
    "READY",
    "FakeSpawner",
    "FakeWorker",
    "Script",
]


@dataclass(frozen=True)
class Script:
    """How a fake worker answers."""

    #: Its answer to ``load``: loaded, load_failed (the handler raised), or crash (it dies).
    load: Literal["loaded", "load_failed", "crash"] = "loaded"
    #: Its answer to ``invoke``: a result (its first argument), or none ever (hang).
    invoke: Literal["result", "hang"] = "result"
    #: The name of a gate its load reply waits for ("": none).
    load_gate: str = ""


READY = Script()
LOAD_FAILS = Script(load="load_failed")
CRASH_WHILE_LOADING = Script(load="crash")
HANG = Script(invoke="hang")

#: The message of a LOAD_FAILS worker's load error.
LOAD_ERROR = "broken on purpose"

_Reply = tuple[dict[str, Any], bytes, str]  # header, blob, the gate it waits for ("")


class FakeWorker(Worker):
    """A scripted worker: the attributes the pool reads, and its pipe, in memory.

    A :class:`Worker` that never started a process: it does not call ``Worker.__init__``
    and overrides every method that would touch a process or an fd (the pool uses no other).
    """

    def __init__(self, spawner: FakeSpawner, pid: int, script: Script, codec: str) -> None:
        # The attributes Worker.__init__ sets that the pool reads (no proc, no fds).
        self.pid = pid
        self.rfd = self.wfd = -1
        self.state = WorkerState.STARTING
        self.function_id = ""
        self.generation = 0
        self.invocations = 0
        self.memory_limit_kb = 0
        self.accepts_context = False
        self.uid: int | None = None
        self.killed_for = None
        self.sent_state_version = -1
        self.sent_desired_version = -1
        self.exit_status: int | None = None
        self.killed_by = ""
        self.maxrss_kb = 0
        self.inherited_maxrss_kb = 0
        self.baseline_rss_kb = 0
        #: Mutable: a test may change how a worker answers from now on.
        self.script = script
        self.codec = codec
        #: How many ``load`` messages it was sent, and the first argument of each invocation.
        self.loads = 0
        self.calls: list[Any] = []
        self._spawner = spawner
        self._cv = spawner.cond
        self._replies: deque[_Reply] = deque([(dict(pipe.ready(pid)), b"", "")])
        self._eof = False  # its pipe closed: it died or was killed
        self._exited = False  # it died by itself (not reaped by the pool yet)

    # -- what the test does ----------------------------------------------------------------

    def die(self, sig: int = signal.SIGKILL) -> None:
        """Killed from outside (as by ``kill -9``): its pipe closes, the pool sees it dead."""
        with self._cv:
            if self.exit_status is None:
                self.exit_status = sig
            self._exited = True
            self._eof = True
            self._cv.notify_all()

    # -- the pipe --------------------------------------------------------------------------

    def limit_frames(self, max_frame: int) -> None:
        pass

    def send(self, header: Mapping[str, object] | bytes, blob: bytes = b"") -> None:
        with self._cv:
            if self._eof:
                raise pipe.FrameError(f"worker {self.pid} pipe closed: EPIPE", eof=True)
            op = pipe.INVOKE if isinstance(header, bytes) else header.get("op")
            if op == pipe.LOAD:
                self._on_load()
            elif op == pipe.INVOKE:
                self._on_invoke(blob)
            self._cv.notify_all()

    def _on_load(self) -> None:
        self.loads += 1
        if self.script.load == "crash":
            self.exit_status = signal.SIGKILL
            self._exited = self._eof = True
        elif self.script.load == "load_failed":
            failed = pipe.load_failed({"type": "handler_error", "message": LOAD_ERROR})
            self._replies.append((dict(failed), b"", self.script.load_gate))
        else:
            self._replies.append((dict(pipe.loaded(False, 1024)), b"", self.script.load_gate))

    def _on_invoke(self, blob: bytes) -> None:
        args, kwargs = pickle.loads(blob)
        value = args[0] if args else None
        self.calls.append(value)
        if self.script.invoke == "hang":
            return
        out = json.dumps(value).encode() if self.codec == "json" else pickle.dumps(value)
        self._replies.append((dict(pipe.result(1024)), out, str(kwargs.get("gate", ""))))

    def recv(self, deadline: float | None) -> tuple[dict[str, Any], bytes]:
        with self._cv:
            while True:
                if self._eof:
                    raise pipe.FrameError(f"worker {self.pid} closed its pipe", eof=True)
                if self._replies:
                    header, blob, gate = self._replies[0]
                    if not gate or gate in self._spawner.opened:
                        self._replies.popleft()
                        return header, blob
                if deadline is None:
                    self._cv.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Deadline
                self._cv.wait(remaining)

    # -- killing and reaping ---------------------------------------------------------------

    def exited(self) -> bool:
        return self._exited

    def wait_exit(self, timeout: float) -> bool:
        return self._exited

    def signal_kill(self) -> None:
        with self._cv:
            if not self._exited:
                self.exit_status = signal.SIGKILL
                self._eof = True
            self._cv.notify_all()

    def kill(self, why: str = "the pool") -> None:
        with self._cv:
            if self.state is WorkerState.DEAD:
                return
            self.change_state(WorkerState.DEAD)
            if not self.killed_by and not self._exited:
                self.killed_by = why
            if self.exit_status is None:
                self.exit_status = signal.SIGKILL
            self._exited = self._eof = True
            self._cv.notify_all()

    def kill_closed(self) -> None:
        self.kill("the pool (its pipe had closed)")


class FakeSpawner:
    """The pool's spawner, with fake workers; records what the pool asked of it."""

    def __init__(self, default: Script = READY) -> None:
        #: The script of every worker not given one by :meth:`plan`.
        self.default = default
        #: Every worker spawned, in order.
        self.workers: list[FakeWorker] = []
        #: The gates opened so far (see :meth:`open`).
        self.opened: set[str] = set()
        #: One condition for every fake worker: opening a gate wakes them all.
        self.cond = threading.Condition()
        self.closed = False
        self.swept: list[tuple[int, frozenset[int]]] = []
        self._plan: deque[Script] = deque()
        self._pids = itertools.count(900_001)

    def plan(self, *scripts: Script) -> None:
        """The scripts of the next workers spawned, in order (then ``default``)."""
        with self.cond:
            self._plan.extend(scripts)

    def open(self, *gates: str) -> None:
        """Let the replies held on these gates go."""
        with self.cond:
            self.opened.update(gates)
            self.cond.notify_all()

    def open_all(self) -> None:
        """Let every held reply go, now and from now on (a test's cleanup)."""
        with self.cond:
            for worker in self.workers:
                self.opened.update(gate for _, _, gate in worker._replies)
                self.opened.add(worker.script.load_gate)
            self.cond.notify_all()

    def live(self) -> list[FakeWorker]:
        with self.cond:
            return [w for w in self.workers if w.state is not WorkerState.DEAD]

    # -- the Spawner protocol --------------------------------------------------------------

    def spawn(self, *, python: str, codec: str, user: str | None, cwd: str | None) -> Worker:
        with self.cond:
            if self.closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            script = self._plan.popleft() if self._plan else self.default
            worker = FakeWorker(self, next(self._pids), script, codec)
            self.workers.append(worker)
            return worker

    def sweep_uid(self, uid: int, keep_sessions: Collection[int] = ()) -> int:
        with self.cond:
            self.swept.append((uid, frozenset(keep_sessions)))
        return 0

    def kill_session(self, uid: int, session: int) -> int:
        with self.cond:
            for worker in self.workers:
                if worker.pid == session:
                    worker.signal_kill()
                    return 1
        return 0

    def close(self) -> None:
        with self.cond:
            self.closed = True
