"""The worker pool: which worker runs which invocation, under which caps.

Every invocation runs in a worker, a fresh interpreter (``python -I``, never a fork of the
multi-threaded agent) in its own session, so its process group is its own and a SIGKILL to
the group takes grandchildren with it. A worker loads one function and stays warm for more
invocations of it until it is killed (timeout, memory), crashes, or is recycled.

The calling thread does the pipe I/O with its checked-out worker itself (no relay thread),
waiting with ``poll`` on the monotonic deadline: at the deadline the parent SIGKILLs the
group and reaps it, whatever the worker is doing. A small set of pre-started generic
interpreters (``prestart``) makes a cold start pay only for loading the handler.

Worker states and the process side: :mod:`agent.exec.pool.process`.

Never call user code in this process; never block while holding the pool lock.
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
import json
import logging
import pickle
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

from agent.errors import (
    AgentError,
    BadRequest,
    EdgeExecutionError,
    FunctionNotFound,
    FunctionTimeout,
    HandlerError,
    MemoryLimitExceeded,
    Overloaded,
    WorkerCrashed,
)
from agent.exec import pipe
from agent.exec.pool.process import (
    _DYING_WAIT_S,
    Worker,
    WorkerLimits,
    WorkerState,
    _Deadline,
    kill_session,
    spawn,
    sweep_uid,
)
from agent.exec.pool.sampler import DEFAULT_INTERVAL_S, TreeSampler, Watched

log = logging.getLogger(__name__)

#: Room in a frame for its header next to the result.
_FRAME_SLACK = 64 * 1024
#: How long a worker that said ``load_failed`` gets to exit by itself (it does at once).
_SELF_EXIT_WAIT_S = 0.5


@dataclass(frozen=True)
class FunctionConfig:
    """What the pool needs to run one function (the runtime and the daemon build these)."""

    function_id: str
    memory_mb: int
    timeout_s: float
    concurrency: int = 1
    environment: Mapping[str, str] = field(default_factory=dict)
    #: ``pickle``: ``handler_blob`` is a cloudpickled callable. ``package``: path + entrypoint.
    kind: str = "pickle"
    handler_blob: bytes = b""
    path: str = ""
    entrypoint: str = ""
    version: str = ""
    #: The function's own uid and gid (its workers take them before loading its code);
    #: None: the pool's ``user`` (or the agent's own).
    uid: int | None = None
    gid: int | None = None
    #: RLIMIT_NPROC of its uid (processes and threads of all its workers); 0: none. Only
    #: applied with a uid of its own: the kernel counts per user.
    max_processes: int = 0


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~3 us to build, per invocation
class InvokeResult:
    value: Any
    cold_start: bool
    duration_ms: float
    rss_kb: int
    worker_pid: int
    accepts_context: bool
    #: The handler's writes to the synced state (None deletes); apply them only on success.
    changes: dict[str, Any] | None = None
    #: The synced-state version the invocation's ``context`` was built from.
    state_version: int = 0
    #: Keys it read or wrote: none may have changed since ``state_version`` at commit.
    checked: list[str] | None = None
    #: It listed the whole document: any change since ``state_version`` conflicts.
    read_all: bool = False


@dataclass(frozen=True)
class ContextInput:
    """The synced state and desired state an invocation's ``context`` starts from.

    Immutable snapshots: the caller replaces them, never mutates them. A worker is sent a
    document only when its version differs from what that worker last received.
    """

    state_version: int = 0
    state: Mapping[str, Any] = field(default_factory=dict)
    desired_version: int = 0
    desired: Mapping[str, Any] = field(default_factory=dict)


EMPTY_CONTEXT = ContextInput()

#: Where an invocation's context comes from: a snapshot, or a function read at send time.
ContextSource = ContextInput | Callable[[], ContextInput] | None
#: Called with a successful result while its worker is still held (see ``invoke``).
OnResult = Callable[[InvokeResult], None]


class _Slot:
    """A deployed function's share of the pool."""

    def __init__(
        self, config: FunctionConfig, generation: int, lock: threading.RLock | None = None
    ) -> None:
        self.config = config
        #: Callers queued for this function wait here, on the pool's lock, so that a
        #: release wakes one of them instead of every queued caller of every function.
        self.cond = threading.Condition(lock)
        self.generation = generation
        self.idle: list[Worker] = []
        self.busy = 0
        self.waiting = 0
        self.load_failures = 0
        self.load_retry_at = 0.0
        self.load_error: EdgeExecutionError | None = None


class WorkerPool:
    """Workers for many functions under one cap. Construction starts nothing: ``start()``."""

    def __init__(
        self,
        *,
        max_workers: int = 8,
        prestart: int = 1,
        max_queue: int = 64,
        max_invocations: int = 10_000,
        codec: str = "pickle",
        python: str = sys.executable,
        user: str | None = None,
        cwd: str | None = None,
        limits: WorkerLimits | None = None,
        sys_path: list[str] | None = None,
        max_frame: int = pipe.MAX_FRAME,
        max_frame_source: str = "",
        sample_interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        if codec not in ("pickle", "json"):
            raise ValueError(f"codec must be pickle or json, got {codec!r}")
        self.max_workers = max_workers
        self.prestart = prestart
        self.max_queue = max_queue
        self.max_invocations = max_invocations
        self.codec = codec
        self.python = python
        self.user = user or None
        self.cwd = cwd
        self.limits = limits or WorkerLimits()
        self.sys_path = list(sys_path or [])
        #: Largest frame a worker may send (a result): checked before it is buffered.
        self.max_frame = max_frame
        #: What sets it, for the error a too-big result gets (a config key).
        self.max_frame_source = max_frame_source
        self._slots: dict[str, _Slot] = {}
        self._generations = itertools.count(1)
        self._live = 0  # function workers alive or being created (the max_workers cap)
        self._generic: deque[Worker] = deque()
        self._all: set[Worker] = set()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._spawn_wanted = threading.Event()
        self._spawner_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-spawn")
        #: The memory of each isolated function's whole tree (functions with a uid).
        self.sampler = TreeSampler(self._tree_over_budget, self._baselines, sample_interval_s)
        self._spawner: threading.Thread | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._spawner is not None or self._closed:
            return
        self._spawner = threading.Thread(target=self._spawn_loop, name="edge-prestart", daemon=True)
        self._spawner.start()
        self.sampler.start()
        self._spawn_wanted.set()

    def close(self, timeout: float = 5.0) -> None:
        """Kill and reap every worker; no zombie or orphan remains.

        Workers in use by an invocation thread are only SIGKILLed here: that thread sees the
        pipe close, reaps the worker and closes its fds itself (closing them under it could
        hand it a recycled fd). We wait for that, then sweep whatever is left.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._wake_all_locked(None)
            self._slots.clear()
            self._generic.clear()
            self._cond.notify_all()
        self._spawn_wanted.set()
        if self._spawner is not None:
            self._spawner.join(timeout=30)
        with self._cond:  # after the join: the spawner adds no worker past this point
            workers = list(self._all)
        busy = {WorkerState.BUSY, WorkerState.LOADING}
        for worker in workers:
            if worker.state in busy:
                worker.signal_kill()
            else:
                self._discard(worker)
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(w.state in busy for w in self._all) and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            leftovers = list(self._all)
        for worker in leftovers:
            self._discard(worker)
        self._spawner_thread.shutdown(wait=False)
        self.sampler.stop()

    def reconfigure(
        self, *, max_workers: int, max_queue: int, max_invocations: int, prestart: int
    ) -> None:
        """Apply new caps (SIGHUP); running workers are not disturbed."""
        with self._cond:
            self.max_workers = max_workers
            self.max_queue = max_queue
            self.max_invocations = max_invocations
            self.prestart = prestart
            self._wake_all_locked(None)
        self._spawn_wanted.set()

    def wait_prestarted(self, timeout: float = 10.0) -> bool:
        """Block until the prestart pool is full (benchmarks and tests)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._generic) < self.prestart and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def _is_closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int]:
        with self._cond:
            return [w.pid for w in self._all if w.state is not WorkerState.DEAD]

    # -- functions -------------------------------------------------------------------------

    def register(self, config: FunctionConfig, preloaded: Worker | None = None) -> None:
        """Deploy (or replace) a function; warm workers of an older config are retired.

        ``preloaded`` is a worker that :meth:`check_load` already loaded with this config:
        it becomes the function's first warm worker, so the first invocation is not cold.
        """
        with self._cond:
            old = self._slots.get(config.function_id)
            slot = _Slot(config, next(self._generations), self._lock)
            if preloaded is not None and self._live < self.max_workers and not self._closed:
                preloaded.generation = slot.generation
                preloaded.change_state(WorkerState.IDLE)
                slot.idle.append(preloaded)
                self._live += 1
                preloaded = None
            # In-flight invocations of the old config finish and are discarded on release.
            retired = old.idle if old is not None else []
            if config.uid is not None:
                self.sampler.watch(config.function_id, config.uid, config.memory_mb)
            self._slots[config.function_id] = slot
            self._live -= len(retired)
            self._wake_all_locked(old)
        for worker in retired:
            self._discard(worker)
        if preloaded is not None:
            self._discard(preloaded)

    def unregister(self, function_id: str) -> bool:
        with self._cond:
            slot = self._slots.pop(function_id, None)
            if slot is None:
                return False
            self._live -= len(slot.idle)
            retired = slot.idle
            if slot.config.uid is not None:
                self.sampler.unwatch(slot.config.uid)
            self._wake_all_locked(slot)
        for worker in retired:
            self._discard(worker)
        return True

    def check_load(self, config: FunctionConfig) -> Worker:
        """Load ``config`` in a fresh worker, so a broken handler never replaces a good one.

        Raises what a cold start would (HandlerError for an import error or a missing
        entrypoint, MemoryLimitExceeded, FunctionTimeout). On success the loaded worker is
        returned: pass it to :meth:`register` (or :meth:`discard` it).
        """
        self.start()
        with self._cond:
            generic = self._generic.popleft() if self._generic else None
        self._spawn_wanted.set()
        return self._load(_Slot(config, 0), generic)

    def discard(self, worker: Worker) -> None:
        """Kill and reap a worker that :meth:`check_load` returned and nobody will use."""
        self._discard(worker)

    def limits_mode(self, function_id: str) -> str:
        """How its memory_mb is enforced: ``rlimit+sampled`` (each process, and the whole tree
        by the sampler: a uid of its own) or ``rlimit`` (each process only)."""
        slot = self._slots.get(function_id)
        isolated = slot is not None and slot.config.uid is not None
        return self.sampler.mode if isolated else "rlimit"

    def _baselines(self, uid: int) -> dict[int, int]:
        """Live workers of ``uid``: session (its pid) -> idle footprint kB (not the budget)."""
        with self._cond:
            return {
                w.pid: w.baseline_rss_kb
                for w in self._all
                if w.uid == uid and w.state is not WorkerState.DEAD
            }

    def _tree_over_budget(self, item: Watched, session: int, held_kb: int, total_kb: int) -> None:
        """Sampler thread: the function's processes together exceed memory_mb."""
        error = MemoryLimitExceeded(
            f"function {item.function_id} exceeded its memory limit: its processes together "
            f"used {total_kb // 1024} MiB over memory_mb {item.limit_kb // 1024} (killed the "
            f"session of pid {session}, {held_kb // 1024} MiB)"
        )
        with self._cond:
            worker = next((w for w in self._all if w.pid == session), None)
            if worker is not None:
                worker.killed_for = error
                worker.killed_by = "the memory sampler"
        log.warning("%s", error, extra={"function_id": item.function_id})
        # A busy worker's thread sees its pipe close, reaps it and reports ``killed_for``.
        kill_session(item.uid, session)

    def has_function(self, function_id: str) -> bool:
        """Whether it is deployed: one dict lookup, for the daemon's per-invoke check."""
        return function_id in self._slots

    def functions(self) -> list[str]:
        with self._cond:
            return list(self._slots)

    # -- invocation ------------------------------------------------------------------------

    def invoke(
        self,
        function_id: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        request_id: str = "",
        queue_timeout: float | None = None,
        context: ContextSource = None,
        on_result: OnResult | None = None,
    ) -> InvokeResult:
        """Run one invocation in a worker; raises an EdgeExecutionError subclass on failure.

        ``context`` is what a handler taking ``context`` sees (empty when None). A callable
        is called when the invocation is handed to its worker, not before it waits for
        one: the state it reads is at least as new as every commit made before it started.

        ``on_result`` runs on success while this invocation still holds its worker (so,
        with ``concurrency`` 1, before the function's next invocation starts): the caller
        commits the write set there. What it raises is raised from here; the worker stays.
        """
        started = time.monotonic()
        blob = self._dumps_arguments(function_id, args, kwargs or {})
        state_version = 0
        # A warm worker found dead at send time never started the invocation: retry once.
        for attempt in (1, 2):
            worker, slot, reserved = self._acquire(function_id, queue_timeout)
            cold = worker is None
            healthy = False
            try:
                if worker is None:
                    worker = self._load(slot, reserved)
                worker.change_state(WorkerState.BUSY)
                deadline = time.monotonic() + slot.config.timeout_s
                try:
                    if worker.accepts_context:
                        state_version = self._send_with_context(
                            worker, request_id, deadline, blob, context
                        )
                    else:
                        worker.send(pipe.invoke_header(request_id), blob)
                except pipe.FrameError:
                    worker.kill_closed()
                    if attempt == 1 and not cold:
                        log.info("warm worker %d of %s had died; retrying", worker.pid, function_id)
                        continue
                    raise worker.death_error(function_id) from None
                header, result_blob = self._await_result(worker, slot.config, deadline)
                worker.invocations += 1
                healthy = True  # from here on the worker answered: it is fine
                if header.get("ok"):
                    result = InvokeResult(
                        value=self._result_value(function_id, header, result_blob),
                        cold_start=cold,
                        duration_ms=(time.monotonic() - started) * 1000,
                        rss_kb=int(header.get("rss_kb", 0)),
                        worker_pid=worker.pid,
                        accepts_context=worker.accepts_context,
                    )
                    changes = header.get("changes")
                    if changes:
                        result.changes = changes
                        result.state_version = state_version
                        result.checked = header.get("checked") or list(changes)
                        result.read_all = bool(header.get("read_all"))
                    if on_result is not None:
                        on_result(result)
                    return result
                error: Mapping[str, Any] = header.get("error") or {}
                if error.get("type") == "memory_exceeded":
                    healthy = False
                    worker.kill("the pool (it reported memory_exceeded and exits)")
                    raise MemoryLimitExceeded(str(error.get("message")))
                raise self._handler_error(error, result_blob)
            finally:
                self._release(slot, worker, healthy and worker is not None)
        raise AssertionError("unreachable")  # pragma: no cover

    def _dumps_arguments(
        self, function_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bytes:
        try:
            return pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            pass
        try:
            import cloudpickle

            return bytes(cloudpickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as exc:
            raise BadRequest(
                f"arguments for {function_id} cannot be sent to a worker: {exc}"
            ) from exc

    def _send_with_context(
        self,
        worker: Worker,
        request_id: str,
        deadline: float,
        blob: bytes,
        context: ContextSource,
    ) -> int:
        """Send an invoke with the context as of now; the state version it carries."""
        ctx = (context() if callable(context) else context) or EMPTY_CONTEXT
        header = pipe.invoke(request_id, deadline)
        if worker.sent_state_version != ctx.state_version:
            header["state"] = dict(ctx.state)
            header["state_version"] = ctx.state_version
        if worker.sent_desired_version != ctx.desired_version:
            header["desired"] = dict(ctx.desired)
            header["desired_version"] = ctx.desired_version
        worker.send(header, blob)
        worker.sent_state_version = ctx.state_version
        worker.sent_desired_version = ctx.desired_version
        return ctx.state_version

    def _await_result(
        self, worker: Worker, config: FunctionConfig, deadline: float
    ) -> tuple[pipe.ResultMsg, bytes]:
        """The worker's answer, or the error its death or the deadline means (worker killed)."""
        try:
            header, blob = worker.recv(deadline)
        except _Deadline:
            worker.kill("the pool at the deadline")
            raise FunctionTimeout(
                f"function {config.function_id} timed out after {config.timeout_s:g}s; "
                f"its worker (pid {worker.pid}) was killed"
            ) from None
        except pipe.FrameError as exc:
            if exc.eof:
                worker.kill_closed()
            else:
                worker.kill("the pool (it broke the pipe protocol)")
            if worker.killed_for is not None:
                raise worker.killed_for from None
            if exc.eof:
                raise worker.death_error(config.function_id) from None
            if isinstance(exc, pipe.FrameTooLarge):
                raise HandlerError(
                    f"function {config.function_id} sent a result of {exc.size} bytes, over "
                    f"the limit of {exc.limit}; its worker (pid {worker.pid}) was killed"
                ) from None
            raise WorkerCrashed(f"worker of {config.function_id} broke protocol: {exc}") from None
        if header.get("op") != pipe.RESULT:
            worker.kill("the pool (it broke the pipe protocol)")
            raise WorkerCrashed(
                f"worker of {config.function_id} broke protocol: it sent {header.get('op')!r} "
                f"instead of {pipe.RESULT!r}"
            )
        return cast("pipe.ResultMsg", header), blob

    def _result_value(self, function_id: str, header: pipe.ResultMsg, blob: bytes) -> Any:
        try:
            return json.loads(blob) if self.codec == "json" else _loads(blob)
        except Exception as exc:
            raise HandlerError(
                f"Edge function failed: {function_id} returned a value this process cannot "
                f"load: {type(exc).__name__}: {exc}"
            ) from exc

    def _acquire(
        self, function_id: str, queue_timeout: float | None
    ) -> tuple[Worker | None, _Slot, Worker | None]:
        """A warm worker, or (None, slot, generic-or-None) when a cold start is reserved."""
        with self._cond:
            slot = self._slots.get(function_id)
            if slot is None or self._closed:
                raise FunctionNotFound(f"Function not found: {function_id}")
            wait_for = slot.config.timeout_s if queue_timeout is None else queue_timeout
            deadline = time.monotonic() + wait_for
            queued: _Slot | None = None
            try:
                while True:
                    current = self._slots.get(function_id)
                    if current is None or self._closed:
                        raise FunctionNotFound(f"Function not found: {function_id}")
                    slot = current
                    if slot.idle:
                        worker = slot.idle.pop()
                        slot.busy += 1
                        return worker, slot, None
                    if slot.busy < slot.config.concurrency:
                        now = time.monotonic()
                        if slot.load_error is not None and now < slot.load_retry_at:
                            raise slot.load_error
                        if self._live < self.max_workers or self._evict_idle_locked():
                            self._live += 1
                            slot.busy += 1
                            generic = self._generic.popleft() if self._generic else None
                            if generic is not None:
                                self._spawn_wanted.set()
                            return None, slot, generic
                    if queued is None:
                        if slot.waiting >= self.max_queue:
                            raise Overloaded(
                                f"function {function_id}: {slot.waiting} invocations already "
                                f"queued (max_queue={self.max_queue})"
                            )
                        slot.waiting += 1
                        queued = slot
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Overloaded(
                            f"function {function_id}: no worker free within {wait_for:g}s"
                        )
                    slot.cond.wait(remaining)
            except BaseException:
                if queued is not None:
                    # It may have been woken for the place it now leaves (the load error of
                    # the cold start before it): pass the wake-up on, or the next caller
                    # sleeps until its own deadline with nobody left to release anything.
                    queued.cond.notify()
                raise
            finally:
                if queued is not None:
                    queued.waiting -= 1

    def _wake_all_locked(self, extra: _Slot | None) -> None:
        """Deploy, undeploy, close, reconfigure: every queued caller re-checks (rare)."""
        for slot in [*self._slots.values(), *([extra] if extra is not None else [])]:
            slot.cond.notify_all()
        self._cond.notify_all()

    def _starved_locked(self, slot: _Slot) -> bool:
        """Every place is taken and another function has callers waiting but no worker."""
        return self._live >= self.max_workers and any(
            other is not slot and other.waiting and not other.busy and not other.idle
            for other in self._slots.values()
        )

    def _evict_idle_locked(self) -> bool:
        """Free one function-worker place by retiring the least used idle worker elsewhere."""
        victims = [(s, w) for s in self._slots.values() for w in s.idle]
        if not victims:
            return False
        slot, worker = min(victims, key=lambda sw: sw[1].invocations)
        slot.idle.remove(worker)
        self._live -= 1
        threading.Thread(target=self._discard, args=(worker,), daemon=True).start()
        return True

    def _release(self, slot: _Slot, worker: Worker | None, healthy: bool) -> None:
        discard = worker is not None and not healthy
        gave_away = False
        with self._cond:
            slot.busy -= 1
            current = self._slots.get(slot.config.function_id)
            if worker is not None and healthy:
                if (
                    current is slot
                    and not self._closed
                    and worker.invocations < self.max_invocations
                ):
                    if slot.waiting and self._starved_locked(slot):
                        # Fair share: every place is taken and another function waits
                        # with no worker at all; this worker's place goes to it, not to
                        # our next caller (who would keep it for as long as we flood).
                        discard = gave_away = True
                    else:
                        worker.change_state(WorkerState.IDLE)
                        slot.idle.append(worker)
                else:
                    discard = True  # redeployed, undeployed, closed or due for recycling
            if worker is None or discard:
                self._live -= 1
                # A place under max_workers came free: one queued caller per function
                # may take it (rare next to the hand-over below).
                for other in self._slots.values():
                    if other.waiting and other is not slot:
                        other.cond.notify()
            elif not slot.waiting and self._live >= self.max_workers:
                # Our worker idles while every place is taken: a waiting caller of another
                # function may now evict it (_evict_idle_locked) instead of timing out.
                for other in self._slots.values():
                    if other.waiting and other is not slot:
                        other.cond.notify()
            if slot.waiting and not gave_away:
                slot.cond.notify()  # the idle worker (or the free place) goes to one caller
            if self._closed:
                self._cond.notify_all()  # close() waits for busy workers to come back
        if discard and worker is not None:
            self._discard(worker)

    def _load(self, slot: _Slot, reserved: Worker | None) -> Worker:
        config = slot.config
        if reserved is not None and reserved.proc.poll() is not None:
            # A pre-started interpreter that died idle (killed from outside, say) never saw
            # this function: not a load failure, so no backoff; start another instead.
            log.info("pre-started worker %d had died; spawning another", reserved.pid)
            self._discard(reserved)
            reserved = None
        try:
            worker = reserved or self._spawn()
        except OSError as exc:  # e.g. worker_user cannot execute the interpreter
            error: EdgeExecutionError = WorkerCrashed(
                f"cannot start a worker for {config.function_id}: {exc}"
            )
            self._note_load_failure(slot, error)
            raise error from exc
        deadline = time.monotonic() + max(config.timeout_s, 10.0)
        try:
            if worker.state is WorkerState.STARTING:
                self._await_ready(worker, deadline)
            worker.change_state(WorkerState.LOADING)
            worker.function_id = config.function_id
            worker.uid = config.uid
            worker.generation = slot.generation
            worker.memory_limit_kb = config.memory_mb * 1024
            header = pipe.load(
                function_id=config.function_id,
                codec=self.codec,
                kind=config.kind,
                path=config.path,
                entrypoint=config.entrypoint,
                environment=dict(config.environment),
                memory_bytes=config.memory_mb * 1024 * 1024,
                rlimits={
                    "nofile": self.limits.nofile,
                    "fsize": self.limits.fsize_bytes,
                    "nproc": config.max_processes if config.uid is not None else 0,
                },
                sys_path=self.sys_path,
                uid=config.uid,
                gid=config.gid,
                # the worker refuses a bigger result itself; the reader is the backstop
                max_result=self.max_frame - _FRAME_SLACK,
                max_result_source=self.max_frame_source,
            )
            worker.send(header, config.handler_blob)
            reply, _ = worker.recv(deadline)
        except _Deadline:
            self._discard(worker, "the pool at the load deadline")
            error = FunctionTimeout(
                f"function {config.function_id}: loading the handler took longer than "
                f"{max(config.timeout_s, 10.0):g}s"
            )
            self._note_load_failure(slot, error)
            raise error from None
        except pipe.FrameError as exc:
            if exc.eof:
                worker.wait_exit(_DYING_WAIT_S)
            self._discard(worker)
            if exc.eof and worker is reserved:
                # The pre-started interpreter died under us (killed from outside just
                # before or while it loaded; the poll above can miss that): no proof that
                # the handler cannot load, and a load failure would fail every caller of
                # the function for the backoff. Once more, in a worker of its own.
                log.info("pre-started worker %d died while loading; spawning another", worker.pid)
                return self._load(slot, None)
            error = worker.death_error(config.function_id)
            self._note_load_failure(slot, error)
            raise error from None
        if reply.get("op") != pipe.LOADED:
            if reply.get("op") == pipe.LOAD_FAILED:
                # a worker's word is untrusted (daemon mode): .get, with defaults
                details: Mapping[str, Any] = reply.get("error") or {}
                # It exits EX_LOAD_FAILED right after saying so: reap that, not our SIGKILL.
                worker.wait_exit(_SELF_EXIT_WAIT_S)
                if details.get("type") == "memory_exceeded":
                    error = MemoryLimitExceeded(str(details.get("message")))
                else:
                    error = HandlerError(str(details.get("message", "failed to load handler")))
                    error.remote_traceback = str(details.get("traceback", ""))  # type: ignore[attr-defined]
            else:
                error = WorkerCrashed(
                    f"worker of {config.function_id} broke protocol: it sent "
                    f"{reply.get('op')!r} instead of {pipe.LOADED!r}"
                )
            self._discard(worker, "the pool (its handler did not load)")
            self._note_load_failure(slot, error, worker)
            raise error
        loaded = cast("pipe.LoadedMsg", reply)
        worker.accepts_context = bool(loaded.get("context"))
        worker.baseline_rss_kb = int(loaded.get("rss_kb", 0))
        worker.change_state(WorkerState.IDLE)
        with self._cond:
            slot.load_failures = 0
            slot.load_error = None
        return worker

    def _note_load_failure(
        self, slot: _Slot, error: EdgeExecutionError, worker: Worker | None = None
    ) -> None:
        """Rate-limit reloading a handler that cannot load: no hot respawn loop."""
        with self._cond:
            slot.load_failures += 1
            backoff = min(0.1 * 2 ** (slot.load_failures - 1), 30.0)
            slot.load_retry_at = time.monotonic() + backoff
            slot.load_error = error
        log.warning(
            "function %s failed to load (%d in a row, next try in %.1fs): %s%s",
            slot.config.function_id,
            slot.load_failures,
            backoff,
            error,
            f"; its worker {worker.exit_reason}" if worker is not None else "",
            extra={"function_id": slot.config.function_id},
        )

    def _handler_error(self, error: Mapping[str, Any], blob: bytes) -> EdgeExecutionError:
        name = str(error.get("exc_name", "Exception"))
        message = str(error.get("message", ""))
        exc = HandlerError(f"Edge function failed: {name}: {message}")
        exc.remote_traceback = str(error.get("traceback", ""))  # type: ignore[attr-defined]
        cause: BaseException | None = None
        if blob and self.codec == "pickle":
            with contextlib.suppress(Exception):
                loaded = pickle.loads(blob)
                if isinstance(loaded, BaseException):
                    cause = loaded
        if cause is None and error.get("exc_module") == "builtins":
            cls = getattr(builtins, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                with contextlib.suppress(Exception):
                    cause = cls(message)
        exc.__cause__ = cause
        return exc

    # -- spawning --------------------------------------------------------------------------

    def _spawn(self) -> Worker:
        # Always from the one spawner thread: a worker's parent-death signal fires when the
        # *thread* that forked it ends, so a short-lived caller thread (local mode) must
        # not be its parent.
        worker = self._spawner_thread.submit(
            spawn, python=self.python, codec=self.codec, user=self.user, cwd=self.cwd
        ).result()
        worker.limit_frames(self.max_frame)
        with self._cond:
            self._all.add(worker)
        return worker

    def _await_ready(self, worker: Worker, deadline: float) -> None:
        header, _ = worker.recv(deadline)
        if header.get("op") != pipe.READY:
            raise pipe.FrameError(f"worker {worker.pid} said {header!r} instead of ready")
        worker.change_state(WorkerState.GENERIC)

    def _discard(self, worker: Worker, why: str = "the pool") -> None:
        worker.kill(why)
        with self._cond:
            self._all.discard(worker)
            self._cond.notify_all()
            keep = {w.pid for w in self._all if w.state is not WorkerState.DEAD}
        if worker.uid is not None:
            # Whatever it started outside its process group dies too (timeout, memory,
            # redeploy, undeploy, recycle, close): its function's uid names them all.
            sweep_uid(worker.uid, keep)

    def sweep(self, uids: Collection[int]) -> int:
        """Kill every process of these function uids that is not a live worker's (at boot:
        what a previous agent left behind, e.g. after ``kill -9``); how many."""
        with self._cond:
            keep = {w.pid for w in self._all if w.state is not WorkerState.DEAD}
        return sum(sweep_uid(uid, keep) for uid in uids)

    def _spawn_loop(self) -> None:
        """Keep ``prestart`` generic interpreters booted so cold starts skip interpreter start."""
        while not self._closed:
            self._spawn_wanted.wait()
            self._spawn_wanted.clear()
            self._fill_prestart()

    def _fill_prestart(self) -> None:
        failures = 0
        while True:
            with self._cond:
                if self._closed or len(self._generic) >= self.prestart:
                    return
            worker: Worker | None = None
            try:
                worker = self._spawn()
                self._await_ready(worker, time.monotonic() + 30)
            except (OSError, pipe.FrameError, _Deadline, AgentError, RuntimeError) as exc:
                died = ""
                if worker is not None:
                    self._discard(worker)
                    died = f"; it {worker.exit_reason}"
                if self._is_closed():  # closing: its spawner thread ended and took the worker
                    return
                if isinstance(exc, RuntimeError):
                    raise
                failures += 1
                log.error("could not pre-start a worker (%d): %s%s", failures, exc, died)
                if failures > 5:
                    return  # cold starts spawn on demand; the next one retries here
                time.sleep(min(0.1 * 2**failures, 5.0))  # spawn backoff, not a sync wait
                continue
            failures = 0
            with self._cond:
                if self._is_closed():  # may have flipped while spawning
                    return  # close() kills it with the rest: it is in self._all
                self._generic.append(worker)
                self._cond.notify_all()


def _loads(blob: bytes) -> Any:
    return pickle.loads(blob) if blob else None
