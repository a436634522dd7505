"""The prestart thread: keeps ``prestart`` generic interpreters booted, so a cold start pays
only for loading the handler, not for starting Python.

The interpreters wait in the allocation's ``generic`` queue (state GENERIC) until a cold
start takes one (which wakes this thread to boot a replacement). Spawn failures back off
and give up after a few in a row: cold starts spawn on demand and the next one wakes this
thread again.

Never hold the pool lock while spawning or waiting for a worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.errors import AgentError
from agent.exec import pipe
from agent.exec.pool.loading import await_ready
from agent.exec.pool.process import Worker, _Deadline
from agent.exec.pool.slots import Allocation

log = logging.getLogger(__name__)


class Prestarter:
    """The thread that refills the allocation's queue of pre-started interpreters."""

    def __init__(
        self,
        *,
        prestart: int,
        allocation: Allocation,
        spawn: Callable[[], Worker],
        discard: Callable[[Worker], None],
    ) -> None:
        #: How many generic interpreters to keep booted (reconfigurable).
        self.prestart = prestart
        self._alloc = allocation
        self._spawn = spawn
        self._discard = discard
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edge-prestart", daemon=True)
        self._thread.start()
        self._wanted.set()

    def wake(self) -> None:
        """Look again: one was taken, the target changed, or the pool is closing."""
        self._wanted.set()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def wait_full(self, timeout: float) -> bool:
        """Block until ``prestart`` interpreters are ready (benchmarks and tests)."""
        deadline = time.monotonic() + timeout
        with self._alloc.cond:
            while len(self._alloc.generic) < self.prestart and not self._alloc.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._alloc.cond.wait(remaining)
        return True

    def _closing(self) -> bool:
        """Read anew each time (it flips while we spawn; a method keeps mypy from assuming)."""
        return self._alloc.closed

    def _loop(self) -> None:
        while not self._alloc.closed:
            self._wanted.wait()
            self._wanted.clear()
            self._fill()

    def _fill(self) -> None:
        failures = 0
        while True:
            with self._alloc.cond:
                if self._alloc.closed or len(self._alloc.generic) >= self.prestart:
                    return
            worker: Worker | None = None
            try:
                worker = self._spawn()
                await_ready(worker, time.monotonic() + 30)
            except (OSError, pipe.FrameError, _Deadline, AgentError, RuntimeError) as exc:
                died = ""
                if worker is not None:
                    self._discard(worker)
                    died = f"; it {worker.exit_reason}"
                if self._closing():  # closing: its spawner thread ended and took the worker
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
            with self._alloc.cond:
                if self._closing():  # may have flipped while spawning
                    return  # close() kills it with the rest: the pool knows every worker
                self._alloc.generic.append(worker)
                self._alloc.cond.notify_all()
