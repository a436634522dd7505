"""The worker pool: which worker runs which invocation, under which caps.

Every invocation runs in a worker, a fresh interpreter (``python -I``, never a fork of the
multi-threaded agent) in its own session, so its process group is its own and a SIGKILL to
the group takes grandchildren with it. A worker loads one function and stays warm for more
invocations of it until it is killed (timeout, memory), crashes, or is recycled.

The calling thread does the pipe I/O with its checked-out worker itself (no relay thread),
waiting with ``poll`` on the monotonic deadline: at the deadline the parent SIGKILLs the
group and reaps it, whatever the worker is doing. A small set of pre-started generic
interpreters (``prestart``) makes a cold start pay only for loading the handler.

:class:`WorkerPool` composes the parts, each in a module of its own:

    slots         allocation only: slots, places under max_workers, queued callers, wake-ups
    loading       loading a handler into a worker; the load-failure backoff
    prestart      the thread that keeps generic interpreters booted
    conversation  one invocation's exchange with its worker
    process       one worker process; the spawner (every OS call, fakeable)
    config        FunctionConfig, InvokeResult, ContextInput

Worker states and the process side: :mod:`agent.exec.pool.process`.

Never call user code in this process; never block while holding the pool lock.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from agent.errors import MemoryLimitExceeded
from agent.exec import pipe
from agent.exec.pool import conversation
from agent.exec.pool.config import (
    ContextSource,
    FunctionConfig,
    InvokeResult,
    OnResult,
)
from agent.exec.pool.direct import Started
from agent.exec.pool.loading import Loader
from agent.exec.pool.prestart import Prestarter
from agent.exec.pool.process import (
    ProcessSpawner,
    Spawner,
    Worker,
    WorkerLimits,
    WorkerState,
)
from agent.exec.pool.sampler import DEFAULT_INTERVAL_S, TreeSampler, Watched
from agent.exec.pool.slots import Allocation, Slot

__all__ = ["WorkerPool"]

log = logging.getLogger(__name__)

#: Room in a frame for its header next to the result.
_FRAME_SLACK = 64 * 1024
#: Largest pickled arguments :meth:`WorkerPool.try_start` sends: well under a pipe's buffer
#: (64 KiB), so its write never waits for the worker to read.
_DIRECT_MAX_ARGS = 48 * 1024


class WorkerPool:
    """Workers for many functions under one cap. Construction starts nothing: ``start()``.

    ``spawner`` is where workers come from (default: real processes, :class:`ProcessSpawner`);
    tests pass ``testing.spawner.FakeSpawner`` to drive the allocation without processes.
    """

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
        spawner: Spawner | None = None,
    ) -> None:
        if codec not in ("pickle", "json"):
            raise ValueError(f"codec must be pickle or json, got {codec!r}")
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
        self._spawner: Spawner = spawner if spawner is not None else ProcessSpawner()
        self._all: set[Worker] = set()
        self._alloc = Allocation(
            max_workers=max_workers,
            max_queue=max_queue,
            max_invocations=max_invocations,
            discard=self._discard,
            generic_taken=lambda: self._prestarter.wake(),
        )
        self._lock = self._alloc.lock
        self._cond = self._alloc.cond
        self._prestarter = Prestarter(
            prestart=prestart, allocation=self._alloc, spawn=self._spawn, discard=self._discard
        )
        self._loader = Loader(cond=self._cond, spawn=self._spawn, discard=self._discard)
        #: The memory of each isolated function's whole tree (functions with a uid).
        self.sampler = TreeSampler(self._tree_over_budget, self._baselines, sample_interval_s)

    # -- caps (the allocation's and the prestart thread's) ----------------------------------

    @property
    def max_workers(self) -> int:
        return self._alloc.max_workers

    @property
    def max_queue(self) -> int:
        return self._alloc.max_queue

    @property
    def max_invocations(self) -> int:
        return self._alloc.max_invocations

    @property
    def prestart(self) -> int:
        return self._prestarter.prestart

    @property
    def _slots(self) -> dict[str, Slot]:
        """The deployed functions' slots (tests look at their queues and backoff)."""
        return self._alloc.slots

    @property
    def _closed(self) -> bool:
        return self._alloc.closed

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._prestarter.started or self._closed:
            return
        self._prestarter.start()
        self.sampler.start()

    def close(self, timeout: float = 5.0) -> None:
        """Kill and reap every worker; no zombie or orphan remains.

        Workers in use by an invocation thread are only SIGKILLed here: that thread sees the
        pipe close, reaps the worker and closes its fds itself (closing them under it could
        hand it a recycled fd). We wait for that, then sweep whatever is left.
        """
        with self._cond:
            if self._closed:
                return
            self._alloc.close_locked()
        self._prestarter.wake()
        self._prestarter.join(timeout=30)
        with self._cond:  # after the join: the prestart thread adds no worker past this point
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
        self._spawner.close()
        self.sampler.stop()

    def reconfigure(
        self, *, max_workers: int, max_queue: int, max_invocations: int, prestart: int
    ) -> None:
        """Apply new caps (SIGHUP); running workers are not disturbed."""
        with self._cond:
            self._alloc.max_workers = max_workers
            self._alloc.max_queue = max_queue
            self._alloc.max_invocations = max_invocations
            self._prestarter.prestart = prestart
            self._alloc.wake_all_locked(None)
        self._prestarter.wake()

    def wait_prestarted(self, timeout: float = 10.0) -> bool:
        """Block until the prestart pool is full (benchmarks and tests)."""
        return self._prestarter.wait_full(timeout)

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
            if config.uid is not None:
                self.sampler.watch(config.function_id, config.uid, config.memory_mb)
            retired = self._alloc.install_locked(config, preloaded)
        for worker in retired:
            self._discard(worker)

    def unregister(self, function_id: str) -> bool:
        with self._cond:
            slot = self._alloc.remove_locked(function_id)
            if slot is None:
                return False
            if slot.config.uid is not None:
                self.sampler.unwatch(slot.config.uid)
        for worker in slot.idle:
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
            generic = self._alloc.generic.popleft() if self._alloc.generic else None
        self._prestarter.wake()
        return self._load(Slot(config, 0), generic)

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
        self._spawner.kill_session(item.uid, session)

    def has_function(self, function_id: str) -> bool:
        """Whether it is deployed: one dict lookup, for the daemon's per-invoke check."""
        return function_id in self._slots

    def concurrency(self, function_id: str) -> int:
        """How many invocations of it may run at once (1 when it is not deployed)."""
        slot = self._slots.get(function_id)
        return slot.config.concurrency if slot is not None else 1

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
        request_json: bytes | None = None,
    ) -> InvokeResult:
        """Run one invocation in a worker; raises an EdgeExecutionError subclass on failure.

        ``request_json`` (JSON codec only): the invoke request's own bytes, checked by the
        caller (``decode_invoke``), sent to the worker as they are instead of ``args``: the
        handler gets its ``payload`` (one encoding from the broker to the worker).

        ``context`` is what a handler taking ``context`` sees (empty when None). A callable
        is called when the invocation is handed to its worker, not before it waits for
        one: the state it reads is at least as new as every commit made before it started.

        ``on_result`` runs on success while this invocation still holds its worker (so,
        with ``concurrency`` 1, before the function's next invocation starts): the caller
        commits the write set there. What it raises is raised from here; the worker stays.
        """
        started = time.monotonic()
        blob, as_json = self._arguments(function_id, args, kwargs or {}, request_json)
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
                        state_version = conversation.send_with_context(
                            worker, request_id, deadline, blob, context, as_json
                        )
                    else:
                        worker.send(pipe.invoke_header(request_id, as_json), blob)
                except pipe.FrameError:
                    worker.kill_closed()
                    if attempt == 1 and not cold:
                        log.info("warm worker %d of %s had died; retrying", worker.pid, function_id)
                        continue
                    raise worker.death_error(function_id) from None
                header, result_blob = conversation.await_result(worker, slot.config, deadline)
                worker.invocations += 1
                healthy = True  # from here on the worker answered: it is fine
                return self._outcome(
                    function_id,
                    worker,
                    header,
                    result_blob,
                    cold=cold,
                    started=started,
                    state_version=state_version,
                    on_result=on_result,
                )
            finally:
                # A worker that reported memory_exceeded was killed: it never goes back.
                alive = worker is not None and worker.state is not WorkerState.DEAD
                self._release(slot, worker, healthy and alive)
        raise AssertionError("unreachable")  # pragma: no cover

    def _arguments(
        self,
        function_id: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        request_json: bytes | None,
    ) -> tuple[bytes, bool]:
        """The invoke frame's blob, and whether it is the request's own JSON (JSON codec
        with ``request_json``) rather than the pickled arguments."""
        if request_json is not None and self.codec == "json":
            return request_json, True
        return conversation.dumps_arguments(function_id, args, kwargs), False

    def _outcome(
        self,
        function_id: str,
        worker: Worker,
        header: pipe.ResultMsg,
        blob: bytes,
        *,
        cold: bool,
        started: float,
        state_version: int = 0,
        on_result: OnResult | None = None,
    ) -> InvokeResult:
        """What a worker's ``result`` frame means: the result, or the error raised (a worker
        that reported memory_exceeded is killed: it exits)."""
        if header.get("ok"):
            raw: bytes | None = None
            if self.codec == "json":  # checked: framed into the reply as is
                value, raw = conversation.result_json(function_id, blob)
            else:
                value = conversation.result_value(self.codec, function_id, header, blob)
            result = InvokeResult(
                value=value,
                cold_start=cold,
                duration_ms=(time.monotonic() - started) * 1000,
                rss_kb=int(header.get("rss_kb", 0)),
                worker_pid=worker.pid,
                accepts_context=worker.accepts_context,
            )
            result.raw = raw
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
            worker.kill("the pool (it reported memory_exceeded and exits)")
            raise MemoryLimitExceeded(str(error.get("message")))
        raise conversation.handler_error(self.codec, error, blob)

    def try_start(
        self,
        function_id: str,
        args: tuple[Any, ...],
        request_id: str,
        request_json: bytes | None = None,
    ) -> Started | None:
        """Send an invocation to an idle warm worker without waiting for anything, for a
        caller that waits for the answer itself (the daemon's loop, on ``Started.fd``);
        None when that cannot be done at once (no idle worker, callers queued, a handler
        that takes a context, arguments over one pipe buffer, a worker found dead): use
        :meth:`invoke` then. ``request_json`` as for :meth:`invoke`."""
        slot = self._slots.get(function_id)
        if slot is None or not slot.idle or slot.waiting:
            return None
        blob, as_json = self._arguments(function_id, args, {}, request_json)
        if len(blob) > _DIRECT_MAX_ARGS:
            return None  # the write could block until the worker reads: not on a loop
        with self._cond:
            current = self._slots.get(function_id)
            if current is not slot or not slot.idle or slot.waiting or self._closed:
                return None
            if slot.idle[-1].accepts_context:
                return None
            worker = slot.idle.pop()
            slot.busy += 1
        started = time.monotonic()
        worker.change_state(WorkerState.BUSY)
        try:
            worker.send(pipe.invoke_header(request_id, as_json), blob)
        except pipe.FrameError:  # it died while idle: it has exited, so this reaps at once
            worker.kill("the pool (its pipe had closed)")
            self._release(slot, worker, False)
            return None
        return Started(self, worker, slot, started + slot.config.timeout_s, started)

    def _acquire(
        self, function_id: str, queue_timeout: float | None
    ) -> tuple[Worker | None, Slot, Worker | None]:
        """A warm worker, or (None, slot, generic-or-None) when a cold start is reserved."""
        return self._alloc.acquire(function_id, queue_timeout)

    def _release(
        self,
        slot: Slot,
        worker: Worker | None,
        healthy: bool,
        defer: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        """Give the place back; a worker that must go is discarded here, or by ``defer``
        (a caller that must not block: killing and reaping it, sweeping its uid)."""
        if self._alloc.release(slot, worker, healthy) and worker is not None:
            if defer is None:
                self._discard(worker)
            else:
                defer(functools.partial(self._discard, worker))

    def _load(self, slot: Slot, reserved: Worker | None) -> Worker:
        return self._loader.load(slot, reserved, self._load_header(slot.config))

    def _load_header(self, config: FunctionConfig) -> pipe.LoadMsg:
        """The ``load`` message for ``config`` under this pool's limits and codec."""
        return pipe.load(
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

    # -- workers ---------------------------------------------------------------------------

    def _spawn(self) -> Worker:
        worker = self._spawner.spawn(
            python=self.python, codec=self.codec, user=self.user, cwd=self.cwd
        )
        worker.limit_frames(self.max_frame)
        with self._cond:
            self._all.add(worker)
        return worker

    def _discard(self, worker: Worker, why: str = "the pool") -> None:
        worker.kill(why)
        with self._cond:
            self._all.discard(worker)
            self._cond.notify_all()
            keep = {w.pid for w in self._all if w.state is not WorkerState.DEAD}
        if worker.uid is not None:
            # Whatever it started outside its process group dies too (timeout, memory,
            # redeploy, undeploy, recycle, close): its function's uid names them all.
            self._spawner.sweep_uid(worker.uid, keep)

    def sweep(self, uids: Collection[int]) -> int:
        """Kill every process of these function uids that is not a live worker's (at boot:
        what a previous agent left behind, e.g. after ``kill -9``); how many."""
        with self._cond:
            keep = {w.pid for w in self._all if w.state is not WorkerState.DEAD}
        return sum(self._spawner.sweep_uid(uid, keep) for uid in uids)
