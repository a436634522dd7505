"""Loading a function's handler into a worker, and backing off from one that cannot load.

A cold start (and ``WorkerPool.check_load``) takes a pre-started interpreter or spawns one,
sends it the function's code and limits, and waits for ``loaded``. A handler that fails to
load is rate-limited: each failure in a row doubles the time (0.1 s up to 30 s) during which
a cold start of that function raises the same error instead of loading again, so a broken
handler never becomes a hot respawn loop. A pre-started interpreter that died before or
while loading says nothing about the handler: it is never counted as a load failure.

Never call user code here, and never hold the pool lock while talking to a worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from agent.errors import (
    EdgeExecutionError,
    FunctionTimeout,
    HandlerError,
    MemoryLimitExceeded,
    WorkerCrashed,
)
from agent.exec import pipe
from agent.exec.pool.process import _DYING_WAIT_S, Worker, WorkerState, _Deadline
from agent.exec.pool.slots import Slot

log = logging.getLogger(__name__)

#: How long a worker that said ``load_failed`` gets to exit by itself (it does at once).
_SELF_EXIT_WAIT_S = 0.5
#: The longest wait between two loads of a handler that keeps failing.
_MAX_BACKOFF_S = 30.0


def await_ready(worker: Worker, deadline: float) -> None:
    """Wait for a new worker's ``ready`` (STARTING -> GENERIC)."""
    header, _ = worker.recv(deadline)
    if header.get("op") != pipe.READY:
        raise pipe.FrameError(f"worker {worker.pid} said {header!r} instead of ready")
    worker.change_state(WorkerState.GENERIC)


class Loader:
    """Loads handlers into workers for the pool; keeps each slot's load-failure backoff."""

    def __init__(
        self,
        *,
        cond: threading.Condition,
        spawn: Callable[[], Worker],
        discard: Callable[[Worker, str], None],
    ) -> None:
        self._cond = cond
        self._spawn = spawn
        self._discard = discard

    def load(self, slot: Slot, reserved: Worker | None, header: pipe.LoadMsg) -> Worker:
        """A worker with ``slot``'s handler loaded (IDLE), in ``reserved`` if given and alive."""
        config = slot.config
        if reserved is not None and reserved.exited():
            # A pre-started interpreter that died idle (killed from outside, say) never saw
            # this function: not a load failure, so no backoff; start another instead.
            log.info("pre-started worker %d had died; spawning another", reserved.pid)
            self._discard(reserved, "the pool")
            reserved = None
        try:
            worker = reserved or self._spawn()
        except OSError as exc:  # e.g. worker_user cannot execute the interpreter
            error: EdgeExecutionError = WorkerCrashed(
                f"cannot start a worker for {config.function_id}: {exc}"
            )
            self.note_failure(slot, error)
            raise error from exc
        deadline = time.monotonic() + max(config.timeout_s, 10.0)
        try:
            if worker.state is WorkerState.STARTING:
                await_ready(worker, deadline)
            worker.change_state(WorkerState.LOADING)
            worker.function_id = config.function_id
            worker.uid = config.uid
            worker.generation = slot.generation
            worker.memory_limit_kb = config.memory_mb * 1024
            worker.send(header, config.handler_blob)
            reply, _ = worker.recv(deadline)
        except _Deadline:
            self._discard(worker, "the pool at the load deadline")
            error = FunctionTimeout(
                f"function {config.function_id}: loading the handler took longer than "
                f"{max(config.timeout_s, 10.0):g}s"
            )
            self.note_failure(slot, error)
            raise error from None
        except pipe.FrameError as exc:
            if exc.eof:
                worker.wait_exit(_DYING_WAIT_S)
            self._discard(worker, "the pool")
            if exc.eof and worker is reserved:
                # The pre-started interpreter died under us (killed from outside just
                # before or while it loaded; the poll above can miss that): no proof that
                # the handler cannot load, and a load failure would fail every caller of
                # the function for the backoff. Once more, in a worker of its own.
                log.info("pre-started worker %d died while loading; spawning another", worker.pid)
                return self.load(slot, None, header)
            error = worker.death_error(config.function_id)
            self.note_failure(slot, error)
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
            self.note_failure(slot, error, worker)
            raise error
        loaded = cast("pipe.LoadedMsg", reply)
        worker.accepts_context = bool(loaded.get("context"))
        worker.baseline_rss_kb = int(loaded.get("rss_kb", 0))
        worker.change_state(WorkerState.IDLE)
        with self._cond:
            slot.load_failures = 0
            slot.load_error = None
        return worker

    def note_failure(
        self, slot: Slot, error: EdgeExecutionError, worker: Worker | None = None
    ) -> None:
        """Rate-limit reloading a handler that cannot load: no hot respawn loop."""
        with self._cond:
            slot.load_failures += 1
            backoff = min(0.1 * 2 ** (slot.load_failures - 1), _MAX_BACKOFF_S)
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
