"""Allocation: which caller gets which place in the pool, and who waits for one.

Owns the pool's one lock, the deployed functions' slots (warm idle workers, busy count,
queued callers), the count of function workers under ``max_workers``, the pre-started
generic interpreters a cold start may take, and every wake-up of a queued caller.

Nothing here talks to a worker or a process: a worker that must go is handed to the
``discard`` callback (outside the lock, or on a thread of its own). Never block while
holding the lock, and never wait without a deadline.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable

from agent.errors import EdgeExecutionError, FunctionNotFound, Overloaded
from agent.exec.pool.config import FunctionConfig
from agent.exec.pool.process import Worker, WorkerState


class Slot:
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
        #: Load-failure backoff (see :mod:`agent.exec.pool.loading`): while ``load_error``
        #: is set and ``load_retry_at`` is ahead, a cold start raises it instead of loading.
        self.load_failures = 0
        self.load_retry_at = 0.0
        self.load_error: EdgeExecutionError | None = None


class Allocation:
    """The pool's allocation state machine, under one lock (``cond``)."""

    def __init__(
        self,
        *,
        max_workers: int,
        max_queue: int,
        max_invocations: int,
        discard: Callable[[Worker], None],
        generic_taken: Callable[[], None],
    ) -> None:
        self.max_workers = max_workers
        self.max_queue = max_queue
        self.max_invocations = max_invocations
        self._discard = discard
        #: Called (under the lock) when a cold start took a pre-started interpreter.
        self._generic_taken = generic_taken
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.slots: dict[str, Slot] = {}
        self._generations = itertools.count(1)
        self.live = 0  # function workers alive or being created (the max_workers cap)
        #: Pre-started interpreters (state GENERIC), filled by the prestart thread.
        self.generic: deque[Worker] = deque()
        self.closed = False

    # -- functions (called with the lock held) ----------------------------------------------

    def install_locked(self, config: FunctionConfig, preloaded: Worker | None) -> list[Worker]:
        """A new slot for ``config`` (replacing the old one); the workers to discard."""
        old = self.slots.get(config.function_id)
        slot = Slot(config, next(self._generations), self.lock)
        if preloaded is not None and self.live < self.max_workers and not self.closed:
            preloaded.generation = slot.generation
            preloaded.change_state(WorkerState.IDLE)
            slot.idle.append(preloaded)
            self.live += 1
            preloaded = None
        # In-flight invocations of the old config finish and are discarded on release.
        retired = list(old.idle) if old is not None else []
        self.slots[config.function_id] = slot
        self.live -= len(retired)
        self.wake_all_locked(old)
        return [*retired, *([preloaded] if preloaded is not None else [])]

    def remove_locked(self, function_id: str) -> Slot | None:
        """Drop the function's slot (its idle workers are the caller's to discard)."""
        slot = self.slots.pop(function_id, None)
        if slot is None:
            return None
        self.live -= len(slot.idle)
        self.wake_all_locked(slot)
        return slot

    def close_locked(self) -> None:
        self.closed = True
        self.wake_all_locked(None)
        self.slots.clear()
        self.generic.clear()
        self.cond.notify_all()

    def wake_all_locked(self, extra: Slot | None) -> None:
        """Deploy, undeploy, close, reconfigure: every queued caller re-checks (rare)."""
        for slot in [*self.slots.values(), *([extra] if extra is not None else [])]:
            slot.cond.notify_all()
        self.cond.notify_all()

    # -- callers ---------------------------------------------------------------------------

    def acquire(
        self, function_id: str, queue_timeout: float | None
    ) -> tuple[Worker | None, Slot, Worker | None]:
        """A warm worker, or (None, slot, generic-or-None) when a cold start is reserved."""
        with self.cond:
            slot = self.slots.get(function_id)
            if slot is None or self.closed:
                raise FunctionNotFound(f"Function not found: {function_id}")
            wait_for = slot.config.timeout_s if queue_timeout is None else queue_timeout
            deadline = time.monotonic() + wait_for
            queued: Slot | None = None
            try:
                while True:
                    current = self.slots.get(function_id)
                    if current is None or self.closed:
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
                        if self.live < self.max_workers or self._evict_idle_locked():
                            self.live += 1
                            slot.busy += 1
                            generic = self.generic.popleft() if self.generic else None
                            if generic is not None:
                                self._generic_taken()
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

    def release(self, slot: Slot, worker: Worker | None, healthy: bool) -> bool:
        """Give the place back; True when ``worker`` must be discarded (by the caller,
        outside the lock)."""
        discard = worker is not None and not healthy
        gave_away = False
        with self.cond:
            slot.busy -= 1
            current = self.slots.get(slot.config.function_id)
            if worker is not None and healthy:
                if (
                    current is slot
                    and not self.closed
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
                self.live -= 1
                # A place under max_workers came free: one queued caller per function
                # may take it (rare next to the hand-over below).
                for other in self.slots.values():
                    if other.waiting and other is not slot:
                        other.cond.notify()
            elif not slot.waiting and self.live >= self.max_workers:
                # Our worker idles while every place is taken: a waiting caller of another
                # function may now evict it (_evict_idle_locked) instead of timing out.
                for other in self.slots.values():
                    if other.waiting and other is not slot:
                        other.cond.notify()
            if slot.waiting and not gave_away:
                slot.cond.notify()  # the idle worker (or the free place) goes to one caller
            if self.closed:
                self.cond.notify_all()  # close() waits for busy workers to come back
        return discard and worker is not None

    def _starved_locked(self, slot: Slot) -> bool:
        """Every place is taken and another function has callers waiting but no worker."""
        return self.live >= self.max_workers and any(
            other is not slot and other.waiting and not other.busy and not other.idle
            for other in self.slots.values()
        )

    def _evict_idle_locked(self) -> bool:
        """Free one function-worker place by retiring the least used idle worker elsewhere."""
        victims = [(s, w) for s in self.slots.values() for w in s.idle]
        if not victims:
            return False
        slot, worker = min(victims, key=lambda sw: sw[1].invocations)
        slot.idle.remove(worker)
        self.live -= 1
        threading.Thread(target=self._discard, args=(worker,), daemon=True).start()
        return True
