"""Fair admission and dispatch of accepted invocations; used from the daemon's loop only.

Bounds (read at every call, so a SIGHUP reload applies at once):

- ``capacity``: invocations accepted and not yet answered, in all (the payloads they hold);
- ``max_queue``: of one function, waiting for a thread (``runtime.max_queue``);
- ``threads``: running at once (each holds an executor thread or a worker until its worker
  answers), and at most ``per_function`` of them one function's (``runtime.max_workers``),
  nor more than its ``concurrency`` (the ``concurrency`` callable): more would only wait
  inside the pool, holding a thread. Free places go to the functions with waiting calls in
  turn (round robin), so a flood of ``f`` queues behind ``f`` only.

Fair share: when ``capacity`` is reached, a call of a function holding fewer than
``capacity / n`` (``n``: functions with accepted calls, the caller's included) takes the
place of the newest waiting call of the function holding the most, which is answered
``overloaded`` instead (it had waited least). A lone flood may fill the room while nobody
else needs it, and still never refuses another function's calls.

Pure: no I/O, no clock, no threads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Function(Generic[T]):
    waiting: deque[T] = field(default_factory=deque)
    running: int = 0

    @property
    def held(self) -> int:
        return len(self.waiting) + self.running


@dataclass(frozen=True)
class Limits:
    capacity: int
    max_queue: int
    threads: int
    per_function: int


class FairQueue(Generic[T]):
    def __init__(
        self, limits: Callable[[], Limits], concurrency: Callable[[str], int] | None = None
    ) -> None:
        self._limits = limits
        #: How many calls of a function may run at once (its spec's ``concurrency``).
        self._concurrency = concurrency
        self._functions: dict[str, _Function[T]] = {}
        self._turns: deque[str] = deque()  # functions with waiting calls, next turn first
        self._total = 0
        self._running = 0

    def __len__(self) -> int:
        """Accepted and not finished (waiting or running)."""
        return self._total

    @property
    def running(self) -> int:
        """Started and not finished."""
        return self._running

    def held(self, function_id: str) -> int:
        fn = self._functions.get(function_id)
        return fn.held if fn is not None else 0

    def offer(self, function_id: str, item: T) -> tuple[str | None, list[T]]:
        """Accept ``item`` or say why not; the calls it displaced (answer them overloaded)."""
        limits = self._limits()
        fn = self._functions.get(function_id)
        if fn is not None and len(fn.waiting) >= limits.max_queue:
            return (
                f"function {function_id}: {len(fn.waiting)} invocations already queued "
                f"(max_queue={limits.max_queue})",
                [],
            )
        displaced: list[T] = []
        if self._total >= limits.capacity:
            victim = self._victim(function_id, limits.capacity)
            if victim is None:
                return (f"{self._total} invocations in progress; retry later", [])
            displaced.append(self._drop_newest(victim))
        if fn is None:
            fn = self._functions[function_id] = _Function()
        fn.waiting.append(item)
        self._total += 1
        if function_id not in self._turns:
            self._turns.append(function_id)
        return None, displaced

    def ready(self) -> list[tuple[str, T]]:
        """Calls to start now (each then counts as running until :meth:`finished`)."""
        limits = self._limits()
        out: list[tuple[str, T]] = []
        skipped = 0  # functions in a row that could not take a thread (at per_function)
        while self._running < limits.threads and self._turns and skipped < len(self._turns):
            function_id = self._turns[0]
            self._turns.rotate(-1)
            fn = self._functions[function_id]
            cap = limits.per_function
            if self._concurrency is not None:
                cap = min(cap, max(1, self._concurrency(function_id)))
            if fn.running >= cap:
                skipped += 1
                continue
            skipped = 0
            out.append((function_id, fn.waiting.popleft()))
            fn.running += 1
            self._running += 1
            if not fn.waiting:
                self._turns.remove(function_id)
        return out

    def finished(self, function_id: str) -> None:
        """A call handed out by :meth:`ready` is done (answered, whatever the outcome)."""
        fn = self._functions[function_id]
        fn.running -= 1
        self._running -= 1
        self._total -= 1
        if not fn.held:
            del self._functions[function_id]

    def _victim(self, function_id: str, capacity: int) -> str | None:
        """Full: the function to take a waiting call from, if ``function_id`` is owed room."""
        sharing = len(self._functions) + (function_id not in self._functions)
        share = max(1, capacity // max(1, sharing))
        if self.held(function_id) >= share:
            return None
        candidates = [
            (fn.held, fid)
            for fid, fn in self._functions.items()
            if fid != function_id and fn.waiting and fn.held > share
        ]
        return max(candidates)[1] if candidates else None

    def _drop_newest(self, function_id: str) -> T:
        fn = self._functions[function_id]
        item = fn.waiting.pop()
        self._total -= 1
        if not fn.waiting and function_id in self._turns:
            self._turns.remove(function_id)
        return item
