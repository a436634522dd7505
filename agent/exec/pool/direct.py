"""An invocation sent to its worker by a caller that does not block: the daemon's loop.

:meth:`WorkerPool.try_start <agent.exec.pool.core.WorkerPool.try_start>` takes an idle warm
worker and sends it the invocation; the caller waits for :attr:`Started.fd` to be readable
among its other sources (no thread of ours in between, both ways), calls :meth:`Started.poll`,
and once it says the answer is in, :meth:`Started.finish`. At :attr:`Started.deadline` it
calls :meth:`~Started.finish` without waiting more: the worker is killed then, as
``WorkerPool.invoke`` would.

The answer is judged by the same code as ``WorkerPool.invoke`` (``conversation``,
``WorkerPool._outcome``): the same checks, errors and limits. Never block the caller:
:attr:`Started.blocks` says when ``finish`` would (it must kill and reap the worker: a
deadline, a death, a broken frame, memory); run it on a thread then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.exec import pipe
from agent.exec.pool import conversation
from agent.exec.pool.config import InvokeResult
from agent.exec.pool.process import Worker, WorkerState
from agent.exec.pool.slots import Slot

if TYPE_CHECKING:
    from agent.exec.pool.core import WorkerPool


class Started:
    """One invocation in flight in a warm worker; used by one thread at a time."""

    def __init__(
        self, pool: WorkerPool, worker: Worker, slot: Slot, deadline: float, started: float
    ) -> None:
        self._pool = pool
        self.worker = worker
        self._slot = slot
        #: Readable when the worker has written (part of) its answer, or died.
        self.fd = worker.rfd
        #: Monotonic: when :meth:`finish` kills the worker instead of waiting more.
        self.deadline = deadline
        self._started = started
        self._frame: tuple[dict[str, Any], bytes] | None = None
        self._error: pipe.FrameError | None = None
        self._done = False
        #: Set by a caller that finishes it on its own (non-blocking) thread.
        self.on_loop = False

    def poll(self) -> bool:
        """Read what the worker has written (non-blocking): True once :meth:`finish` can
        say how it went without waiting (the answer is in, or the pipe failed)."""
        if self._frame is None and self._error is None:
            try:
                self._frame = self.worker.try_recv()
            except pipe.FrameError as exc:
                self._error = exc
            except OSError as exc:  # the pipe itself failed: as if it had closed
                self._error = pipe.FrameError(f"worker {self.worker.pid} pipe: {exc}", eof=True)
        return self._frame is not None or self._error is not None

    @property
    def blocks(self) -> bool:
        """Whether :meth:`finish` kills and reaps the worker (run it on a thread): not for
        a result or a handler's error, the common answers."""
        if self._frame is None:
            return True  # the deadline, or the pipe failed
        header = self._frame[0]
        if header.get("op") != pipe.RESULT:
            return True
        if header.get("ok"):
            return False
        error = header.get("error") or {}
        return bool(error.get("type") == "memory_exceeded")

    def finish(self, defer: Callable[[Callable[[], None]], object] | None = None) -> InvokeResult:
        """The invocation's result, or the EdgeExecutionError it ended with; the worker is
        given back (killed first at the deadline, or if it died or broke the protocol).
        ``defer`` runs the discard of a worker that must go (recycling), if any."""
        if self._done:
            raise RuntimeError("Started.finish called twice")
        self._done = True
        worker, config = self.worker, self._slot.config
        healthy = False
        try:
            if self._error is not None:
                raise conversation.broken(worker, config, self._error)
            if self._frame is None:
                raise conversation.timed_out(worker, config)
            header, blob = conversation.checked_result(worker, config, *self._frame)
            worker.invocations += 1
            healthy = True
            return self._pool._outcome(
                config.function_id, worker, header, blob, cold=False, started=self._started
            )
        finally:
            alive = worker.state is not WorkerState.DEAD
            self._pool._release(self._slot, worker, healthy and alive, defer)

    def abandon(self, why: str) -> None:
        """Kill the worker and give its place back without an answer (the caller stops)."""
        if self._done:
            return
        self._done = True
        self.worker.kill(why)
        self._pool._release(self._slot, self.worker, False)
