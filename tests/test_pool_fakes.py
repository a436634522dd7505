"""The pool's allocation state machine, in-process: WorkerPool with a FakeSpawner.

No worker process is started: each fake worker answers the pool's pipe messages as its
script says and holds a reply back on a named gate until the test opens it, so a test
decides exactly which invocation is busy, loading or queued. The real-process tests of the
same behaviour stay in tests/test_pool.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import pytest
from procutil import in_thread

from agent.errors import (
    FunctionNotFound,
    FunctionTimeout,
    HandlerError,
    Overloaded,
    WorkerCrashed,
)
from agent.exec.pool import FunctionConfig, InvokeResult, WorkerPool, WorkerState
from testing.spawner import (
    CRASH_WHILE_LOADING,
    HANG,
    LOAD_ERROR,
    LOAD_FAILS,
    FakeSpawner,
    Script,
)
from testing.wait import wait_for

#: Long enough never to be reached by a passing test; a broken one fails at SETTLE_S.
QUEUE_TIMEOUT_S = 30.0
SETTLE_S = 5.0


@contextmanager
def fake_pool(spawner: FakeSpawner | None = None, **kwargs: Any) -> Iterator[WorkerPool]:
    kwargs.setdefault("prestart", 0)
    pool = WorkerPool(spawner=spawner or FakeSpawner(), **kwargs)
    pool.start()
    try:
        yield pool
    finally:
        if spawner is not None:
            spawner.open_all()
        pool.close()


def _config(
    function_id: str = "f", *, concurrency: int = 1, timeout_s: float = 30
) -> FunctionConfig:
    return FunctionConfig(
        function_id=function_id, memory_mb=64, timeout_s=timeout_s, concurrency=concurrency
    )


def _call(
    pool: WorkerPool, value: Any, gate: str = "", function_id: str = "f"
) -> Callable[[], Any]:
    kwargs = {"gate": gate} if gate else {}
    return lambda: pool.invoke(function_id, (value,), kwargs, queue_timeout=QUEUE_TIMEOUT_S).value


def _all_done(futures: list[Future[Any]], what: str) -> None:
    wait_for(lambda: all(f.done() for f in futures), SETTLE_S, what)


def test_concurrency_caps_the_workers_and_max_queue_the_waiting_callers() -> None:
    """concurrency 2: two callers run (two workers), the next two queue without a third
    worker although max_workers allows it, and one more is Overloaded at once (max_queue 2)."""
    spawner = FakeSpawner()
    with fake_pool(spawner, max_workers=8, max_queue=2) as pool:
        pool.register(_config(concurrency=2))
        slot = pool._slots["f"]
        running = [in_thread(_call(pool, i, gate="go")) for i in (1, 2)]
        wait_for(lambda: slot.busy == 2, SETTLE_S, "the first two callers never ran")
        queued = [in_thread(_call(pool, i)) for i in (3, 4)]
        wait_for(lambda: slot.waiting == 2, SETTLE_S, "the next two callers never queued")
        assert len(spawner.workers) == 2, "a third worker for a function of concurrency 2"
        with pytest.raises(Overloaded, match="max_queue=2"):
            pool.invoke("f", (5,), queue_timeout=QUEUE_TIMEOUT_S)
        spawner.open("go")
        _all_done([*running, *queued], "the callers were not all answered")
        assert sorted(f.result() for f in [*running, *queued]) == [1, 2, 3, 4]
        assert len(spawner.workers) == 2
        assert sum(len(w.calls) for w in spawner.workers) == 4


def test_queued_callers_get_the_worker_in_arrival_order() -> None:
    """A released worker goes to the caller that queued first, one at a time."""
    spawner = FakeSpawner()
    with fake_pool(spawner) as pool:
        pool.register(_config())
        slot = pool._slots["f"]
        first = in_thread(_call(pool, 0, gate="first"))
        wait_for(lambda: slot.busy == 1, SETTLE_S, "the first caller never ran")
        queued = []
        for i in (1, 2, 3):
            queued.append(in_thread(_call(pool, i)))
            wait_for(lambda n=i: slot.waiting == n, SETTLE_S, f"caller {i} never queued")
        spawner.open("first")
        _all_done([first, *queued], "the queued callers were not all answered")
        [worker] = spawner.workers
        assert worker.calls == [0, 1, 2, 3]


def test_a_queued_caller_that_raises_passes_its_wake_up_on() -> None:
    """The cold start fails to load while two callers wait for the function's only place:
    the first caller woken raises the load error and must wake the next, or that one sleeps
    until its queue timeout with nobody left to wake it (commit 42592ed)."""
    spawner = FakeSpawner()
    spawner.plan(Script(load="load_failed", load_gate="load"))
    with fake_pool(spawner) as pool:
        pool.register(_config())
        slot = pool._slots["f"]
        loading = in_thread(_call(pool, 0))
        wait_for(lambda: spawner.workers and spawner.workers[0].loads, SETTLE_S, "no load began")
        queued = [in_thread(_call(pool, i)) for i in (1, 2)]
        wait_for(lambda: slot.waiting == 2, SETTLE_S, "the two callers never queued")
        slot.load_failures = 10  # a long backoff: whoever is woken sees the load error
        spawner.open("load")
        futures = [loading, *queued]
        _all_done(futures, "a queued caller was never woken after the load failed")
        for future in futures:
            with pytest.raises(HandlerError, match=LOAD_ERROR):
                future.result()
        assert len(spawner.workers) == 1, "a caller loaded again during the backoff"


def test_a_handler_that_cannot_load_backs_off_then_loads_again() -> None:
    """A load failure fails the function's cold starts without a new worker until its backoff
    ends (0.1 s, then 0.2 s: doubling); after it a cold start loads again, and a success
    clears the failure count."""
    spawner = FakeSpawner()
    spawner.plan(LOAD_FAILS, LOAD_FAILS)
    with fake_pool(spawner) as pool:
        pool.register(_config())
        slot = pool._slots["f"]
        with pytest.raises(HandlerError, match=LOAD_ERROR):
            pool.invoke("f", (1,))
        assert (len(spawner.workers), slot.load_failures) == (1, 1)
        with pytest.raises(HandlerError, match=LOAD_ERROR):
            pool.invoke("f", (2,))
        assert len(spawner.workers) == 1, "loaded again inside the backoff"
        wait_for(lambda: time.monotonic() >= slot.load_retry_at, SETTLE_S, "backoff never ended")
        before = time.monotonic()
        with pytest.raises(HandlerError, match=LOAD_ERROR):
            pool.invoke("f", (3,))
        assert (len(spawner.workers), slot.load_failures) == (2, 2)
        assert slot.load_retry_at >= before + 0.2, "the second backoff did not double"
        wait_for(lambda: time.monotonic() >= slot.load_retry_at, SETTLE_S, "backoff never ended")
        result = pool.invoke("f", (4,))
        assert result.value == 4 and result.cold_start
        assert (slot.load_failures, slot.load_error) == (0, None)
        assert all(w.state is WorkerState.DEAD for w in spawner.workers[:2])


@pytest.mark.parametrize("when", ["idle", "loading"])
def test_a_prestarted_worker_that_died_is_not_a_load_failure(when: str) -> None:
    """The pre-started interpreter a cold start takes was killed from outside, before it was
    taken or while it loaded: the load runs once more in a fresh worker and answers, with no
    load failure counted (commit 5973950: the caller got worker_crashed, and so did every
    caller for the backoff after it)."""
    spawner = FakeSpawner()
    with fake_pool(spawner, prestart=1) as pool:
        assert pool.wait_prestarted(SETTLE_S), "the prestart pool never filled"
        [generic] = spawner.workers
        if when == "idle":
            generic.die()
        else:
            generic.script = CRASH_WHILE_LOADING
        pool.register(_config())
        result = pool.invoke("f", (7,))
        assert result.value == 7 and result.cold_start
        assert result.worker_pid != generic.pid
        assert generic.state is WorkerState.DEAD
        assert generic.loads == (0 if when == "idle" else 1)
        slot = pool._slots["f"]
        assert (slot.load_failures, slot.load_error) == (0, None)


def test_a_fresh_worker_that_dies_while_loading_is_a_load_failure() -> None:
    """The counterpart: a worker spawned for this very load dies loading it; that is the
    handler's doing as far as the pool can tell, so it fails and backs off."""
    spawner = FakeSpawner()
    spawner.plan(CRASH_WHILE_LOADING)
    with fake_pool(spawner) as pool:
        pool.register(_config())
        with pytest.raises(WorkerCrashed):
            pool.invoke("f", (1,))
        assert len(spawner.workers) == 1, "retried a load that was not a pre-started worker's"
        assert pool._slots["f"].load_failures == 1


def test_close_answers_the_running_and_the_queued_callers() -> None:
    """close() kills a busy worker (its caller gets worker_crashed) and wakes every queued
    caller at once (function not found), not only when a running invocation of their function
    gives its place back: here that one holds its worker (in ``on_result``) until after."""
    spawner = FakeSpawner()
    with fake_pool(spawner) as pool:
        pool.register(_config())
        pool.register(_config("g"))
        slot = pool._slots["f"]
        entered, hold = threading.Event(), threading.Event()

        def holding(result: InvokeResult) -> None:
            entered.set()
            hold.wait(QUEUE_TIMEOUT_S)

        crashing = in_thread(_call(pool, 0, gate="never", function_id="g"))
        holder = in_thread(lambda: pool.invoke("f", (1,), on_result=holding).value)
        wait_for(entered.is_set, SETTLE_S, "the caller of f never got its result")
        wait_for(lambda: pool._slots["g"].busy == 1, SETTLE_S, "the caller of g never ran")
        queued = [in_thread(_call(pool, i)) for i in (2, 3)]
        wait_for(lambda: slot.waiting == 2, SETTLE_S, "the two callers never queued")
        closing = in_thread(pool.close)
        _all_done([crashing, *queued], "close() left a caller waiting")
        assert not holder.done()
        with pytest.raises(WorkerCrashed):
            crashing.result()
        for future in queued:
            with pytest.raises(FunctionNotFound):
                future.result()
        hold.set()
        _all_done([holder, closing], "close() never returned")
        assert holder.result() == 1
        assert not spawner.live(), "close() left a worker alive"
        assert spawner.closed


def test_a_worker_is_recycled_after_max_invocations() -> None:
    """With max_invocations 2, every third invocation is a cold start in a new worker; the
    old one is killed by the pool."""
    spawner = FakeSpawner()
    with fake_pool(spawner, max_invocations=2) as pool:
        pool.register(_config())
        results = [pool.invoke("f", (i,)) for i in range(5)]
        assert [r.cold_start for r in results] == [True, False, True, False, True]
        pids = [r.worker_pid for r in results]
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
        assert len(spawner.workers) == 3
        assert [w.state for w in spawner.workers[:2]] == [WorkerState.DEAD] * 2
        assert spawner.workers[0].killed_by == "the pool"


def test_a_hung_invocation_times_out_and_its_place_is_reused() -> None:
    """A worker that never answers is killed at the invocation's deadline (function_timeout);
    the place it held goes back, so the next caller gets a fresh worker."""
    spawner = FakeSpawner()
    spawner.plan(HANG)
    with fake_pool(spawner, max_workers=1) as pool:
        pool.register(_config(timeout_s=0.2))
        with pytest.raises(FunctionTimeout):
            pool.invoke("f", (1,))
        hung = spawner.workers[0]
        assert hung.state is WorkerState.DEAD and hung.killed_by == "the pool at the deadline"
        result = pool.invoke("f", (2,))
        assert result.value == 2 and result.cold_start and result.worker_pid != hung.pid
