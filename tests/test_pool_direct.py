"""``WorkerPool.try_start`` and ``Started`` (issue 15): an invocation sent to an idle warm
worker by a caller that waits for the answer itself (the daemon's loop), with real worker
processes. Its answers must be the ones ``WorkerPool.invoke`` gives (the same checks, errors
and limits), it must never block where the loop would stall, and the worker must go back to
the pool (or be killed) exactly as after ``invoke``. Every test ends with a leak check.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from procutil import RuntimeFactory, run_threads

from agent import EdgeFunction, EdgeRuntime, FunctionTimeout, HandlerError, WorkerCrashed
from agent.exec.pool import WorkerPool
from agent.exec.pool.direct import Started


@pytest.fixture
def runtime() -> Iterator[EdgeRuntime]:
    with RuntimeFactory() as factory:
        yield factory(max_invocations=1000)


def deploy_warm(runtime: EdgeRuntime, fid: str, handler: Callable[..., Any], **kw: Any) -> int:
    """Deploy and invoke once (a cold start), so an idle warm worker waits; its pid."""
    runtime.deploy(EdgeFunction(id=fid, name=fid, handler=handler, **kw))
    return runtime.execute(fid, (None,)).worker_pid


def answer(started: Started, timeout: float = 10.0) -> Started:
    """Wait for its fd as the loop does (poll, then ``Started.poll``), with a deadline."""
    poller = select.poll()
    poller.register(started.fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while not started.poll():
        left = deadline - time.monotonic()
        assert left > 0, f"no answer from worker {started.worker.pid} within {timeout}s"
        poller.poll(int(left * 1000) + 1)
    return started


def start(pool: WorkerPool, fid: str, payload: Any, rid: str = "r1") -> Started:
    started = pool.try_start(fid, (payload,), rid)
    assert started is not None, f"{fid}: no idle warm worker was taken"
    return started


def echo(x: Any) -> Any:
    return x


def boom(x: Any) -> Any:
    if x is None:  # deploy_warm's first call
        return None
    raise ValueError(f"boom {x}")


def nap(x: Any) -> Any:
    time.sleep(x or 0)
    return "woke"


def die(x: Any) -> Any:
    if x:
        os._exit(7)
    return "alive"


def slow_echo(x: Any) -> Any:
    if isinstance(x, float):
        time.sleep(x)
    return x


def takes_context(x: Any, context: Any = None) -> Any:
    return x


def test_a_result_is_answered_without_blocking_and_the_worker_goes_back(
    runtime: EdgeRuntime,
) -> None:
    pid = deploy_warm(runtime, "echo", echo)
    started = start(runtime.pool, "echo", {"a": 1})
    assert started.worker.pid == pid
    assert not answer(started).blocks
    result = started.finish()
    assert (result.value, result.cold_start, result.worker_pid) == ({"a": 1}, False, pid)
    again = runtime.execute("echo", (2,))  # back in the pool, warm
    assert (again.value, again.worker_pid, again.cold_start) == (2, pid, False)


def test_a_handler_error_is_raised_as_invoke_raises_it_and_the_worker_stays(
    runtime: EdgeRuntime,
) -> None:
    pid = deploy_warm(runtime, "boom", boom)
    started = answer(start(runtime.pool, "boom", "x"))
    assert not started.blocks
    with pytest.raises(HandlerError, match="ValueError: boom x"):
        started.finish()
    with pytest.raises(HandlerError) as raised:
        runtime.execute("boom", ("y",))
    assert "boom y" in str(raised.value)
    assert runtime.pool.worker_pids().count(pid) == 1  # still warm: a handler error is fine


def test_at_the_deadline_finish_kills_the_worker_and_raises_timeout(runtime: EdgeRuntime) -> None:
    pid = deploy_warm(runtime, "nap", nap, timeout_seconds=1)
    started = start(runtime.pool, "nap", 30)
    assert not started.poll(), "answered while it sleeps"
    assert started.blocks  # no answer yet: finishing means a kill and a reap
    assert started.deadline <= time.monotonic() + 1.0
    with pytest.raises(FunctionTimeout, match="timed out after 1s"):
        started.finish()
    assert pid not in runtime.pool.worker_pids()
    fresh = runtime.execute("nap", (0,))
    assert fresh.value == "woke" and fresh.cold_start and fresh.worker_pid != pid


def test_a_worker_that_dies_is_worker_crashed_with_its_exit_code(runtime: EdgeRuntime) -> None:
    pid = deploy_warm(runtime, "die", die)
    started = answer(start(runtime.pool, "die", True))  # its pipe closes: readable, EOF
    assert started.blocks
    with pytest.raises(WorkerCrashed, match="7"):
        started.finish()
    assert pid not in runtime.pool.worker_pids()
    assert runtime.execute("die", (False,)).value == "alive"


def test_nothing_is_taken_when_it_cannot_start_at_once(runtime: EdgeRuntime) -> None:
    """No idle warm worker (not deployed, not yet loaded, all busy), or a handler that takes
    a context: None, and the pool's state is unchanged (``invoke`` serves it then)."""
    pool = runtime.pool
    assert pool.try_start("nope", (1,), "r") is None
    runtime.deploy(EdgeFunction(id="cold", name="cold", handler=echo))
    assert pool.try_start("cold", (1,), "r") is None  # no worker loaded yet
    deploy_warm(runtime, "ctx", takes_context)
    assert pool.try_start("ctx", (1,), "r") is None
    assert runtime.execute("ctx", (3,)).value == 3
    deploy_warm(runtime, "echo", echo)
    busy = start(pool, "echo", 1)
    assert pool.try_start("echo", (2,), "r2") is None  # concurrency 1: its worker is busy
    assert answer(busy).finish().value == 1
    assert answer(start(pool, "echo", 3)).finish().value == 3


def test_a_recycled_worker_is_discarded_by_the_callers_deferral(
    runtime: EdgeRuntime,
) -> None:
    """After max_invocations the worker must go: killing and reaping it would block, so
    ``finish`` hands the discard to ``defer`` (the daemon's executor) and returns."""
    pool = runtime.pool
    pool.reconfigure(max_workers=pool.max_workers, max_queue=64, max_invocations=2, prestart=1)
    pid = deploy_warm(runtime, "echo", echo)  # its first invocation
    deferred: list[Callable[[], None]] = []
    result = answer(start(pool, "echo", "second")).finish(defer=deferred.append)
    assert result.value == "second"
    assert len(deferred) == 1 and pid in runtime.pool.worker_pids()
    deferred[0]()
    assert pid not in runtime.pool.worker_pids()
    assert runtime.execute("echo", (1,)).cold_start is True


def test_abandon_kills_the_worker_and_frees_its_place(runtime: EdgeRuntime) -> None:
    pid = deploy_warm(runtime, "nap", nap)
    started = start(runtime.pool, "nap", 30)
    started.abandon("the test (stopping)")
    assert pid not in runtime.pool.worker_pids()
    assert runtime.execute("nap", (0,)).value == "woke"


def test_a_burst_of_direct_starts_gets_every_answer_once(runtime: EdgeRuntime) -> None:
    """Two warm workers, 200 invocations started as fast as they free up and answered out
    of a shared poll, the way the loop drives them: each answer is its own invocation's."""
    runtime.deploy(EdgeFunction(id="echo", name="echo", handler=slow_echo, concurrency=2))
    warmed = run_threads(2, lambda _i: runtime.execute("echo", (0.3,)))  # overlapping
    assert len({r.worker_pid for r in warmed}) == 2, f"not two warm workers: {warmed}"
    pending = list(range(200))
    running: dict[int, tuple[Started, int]] = {}
    poller = select.poll()
    answers: dict[int, Any] = {}
    deadline = time.monotonic() + 30
    while pending or running:
        assert time.monotonic() < deadline, f"stuck: {len(answers)} answered"
        while pending:
            started = runtime.pool.try_start("echo", (pending[0],), f"r{pending[0]}")
            if started is None:
                break
            running[started.fd] = (started, pending.pop(0))
            poller.register(started.fd, select.POLLIN)
        for fd, _ in poller.poll(1000):
            started, n = running[fd]
            if started.poll():
                del running[fd]
                poller.unregister(fd)
                assert n not in answers
                answers[n] = started.finish().value
    assert answers == {n: n for n in range(200)}
