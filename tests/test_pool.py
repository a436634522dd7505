"""The worker pool under EdgeRuntime: warm reuse, cold starts, prestart, concurrency, queueing,
recycling and redeploys, with real worker processes. Every test ends with a leak check.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from procutil import (
    HANDLERS_PKG,
    RuntimeFactory,
    in_thread,
    leak_check,
    max_overlap,
    pid_is_gone,
    run_threads,
)

from agent import EdgeFunction, EdgeRuntime, FunctionNotFound, HandlerError, Overloaded
from agent.exec.pool import FunctionConfig, WorkerPool
from testing.wait import wait_for


@pytest.fixture
def make_runtime() -> Iterator[RuntimeFactory]:
    with RuntimeFactory() as factory:
        yield factory


@pytest.fixture
def runtime(make_runtime: RuntimeFactory) -> EdgeRuntime:
    return make_runtime()


def _make_interval() -> Callable[[float], tuple[float, float]]:
    """A handler returning its (start, end) on CLOCK_MONOTONIC, which is system-wide on Linux."""

    def interval(seconds: float) -> tuple[float, float]:
        start = time.monotonic()
        time.sleep(seconds)
        return start, time.monotonic()

    return interval


# -- warm workers and cold starts --------------------------------------------------------------


def test_first_invoke_is_cold_then_warm_on_the_same_worker(runtime: EdgeRuntime) -> None:
    """The first invocation after deploy is a cold start; the next ones reuse its worker."""
    runtime.deploy(EdgeFunction(id="f", name="f", handler=lambda x: x + 1))
    first = runtime.execute("f", (1,))
    second = runtime.execute("f", (2,))
    third = runtime.execute("f", (3,))

    assert (first.value, second.value, third.value) == (2, 3, 4)
    assert first.cold_start is True
    assert second.cold_start is False and third.cold_start is False
    assert first.worker_pid == second.worker_pid == third.worker_pid
    assert [r.cold_start for r in runtime.metrics.records] == [True, False, False]


def test_redeploy_makes_the_next_invoke_cold_on_a_new_worker(runtime: EdgeRuntime) -> None:
    """Deploying the same id again retires the warm worker: the new handler answers, cold."""
    runtime.deploy(EdgeFunction(id="f", name="f", handler=lambda: "v1"))
    old = runtime.execute("f")
    assert runtime.execute("f").cold_start is False

    runtime.deploy(EdgeFunction(id="f", name="f", handler=lambda: "v2"))
    new = runtime.execute("f")

    assert new.value == "v2"
    assert new.cold_start is True
    assert new.worker_pid != old.worker_pid
    wait_for(lambda: pid_is_gone(old.worker_pid), 2.0, "the retired warm worker was not reaped")


def test_cold_start_uses_the_prestarted_worker(make_runtime: RuntimeFactory) -> None:
    """With the prestart pool full, a cold start loads the handler into the waiting interpreter."""
    runtime = make_runtime(prestart=1)
    runtime.deploy(EdgeFunction(id="f", name="f", handler=lambda: "hi"))
    assert runtime.pool.wait_prestarted(timeout=10), "the prestart pool never filled"
    prestarted = set(runtime.pool.worker_pids())
    assert len(prestarted) == 1

    result = runtime.execute("f")

    assert result.cold_start is True
    assert result.worker_pid in prestarted
    # The pool refills itself for the next cold start.
    assert runtime.pool.wait_prestarted(timeout=10)
    wait_for(lambda: len(runtime.pool.worker_pids()) == 2, 5, "no new generic worker")


def test_prestart_zero_spawns_on_demand(make_runtime: RuntimeFactory) -> None:
    """Without a prestart pool the cold start spawns its own worker."""
    runtime = make_runtime(prestart=0)
    runtime.deploy(EdgeFunction(id="f", name="f", handler=lambda: 7))
    assert runtime.pool.worker_pids() == []
    assert runtime.execute("f").cold_start is True
    assert runtime.invoke("f") == 7
    assert len(runtime.pool.worker_pids()) == 1


def test_recycling_after_max_invocations(make_runtime: RuntimeFactory) -> None:
    """With max_invocations=3 the fourth invocation runs in a fresh worker."""
    runtime = make_runtime(max_invocations=3)
    runtime.deploy(EdgeFunction(id="f", name="f", handler=lambda: None))
    pids = [runtime.execute("f").worker_pid for _ in range(4)]

    assert pids[0] == pids[1] == pids[2]
    assert pids[3] != pids[0]
    wait_for(lambda: pid_is_gone(pids[0]), 2.0, "the recycled worker was not reaped")


def test_undeploy_stops_the_functions_workers(runtime: EdgeRuntime) -> None:
    """undeploy retires the warm worker; invoking afterwards is FunctionNotFound."""
    runtime.deploy(EdgeFunction(id="f", name="f", handler=lambda: 1))
    pid = runtime.execute("f").worker_pid

    assert runtime.undeploy("f") is True
    assert pid_is_gone(pid)
    with pytest.raises(FunctionNotFound):
        runtime.invoke("f")
    assert runtime.undeploy("f") is False


def test_redeploy_during_an_invocation_lets_it_finish(runtime: EdgeRuntime, tmp_path: Path) -> None:
    """An in-flight invocation of the old version finishes; the next one runs the new handler."""

    def old(marker: str = "") -> str:
        if marker:
            with open(marker, "w") as f:
                f.write("running")
            time.sleep(0.5)
        return "old"

    runtime.deploy(EdgeFunction(id="f", name="f", handler=old, timeout_seconds=10))
    old_pid = runtime.execute("f").worker_pid
    marker = tmp_path / "running"
    in_flight = in_thread(lambda: runtime.invoke("f", str(marker)))
    wait_for(marker.exists, 5.0, "the old handler never started")

    runtime.deploy(EdgeFunction(id="f", name="f", handler=lambda marker="": "new"))

    assert in_flight.result(timeout=10) == "old"
    assert runtime.invoke("f") == "new"
    wait_for(lambda: pid_is_gone(old_pid), 2.0, "the old version's worker was not retired")


def test_max_workers_evicts_an_idle_worker_of_another_function(
    make_runtime: RuntimeFactory,
) -> None:
    """At the max_workers cap a cold start retires another function's idle worker."""
    runtime = make_runtime(max_workers=1, prestart=0)
    runtime.deploy(EdgeFunction(id="a", name="a", handler=lambda: "a"))
    runtime.deploy(EdgeFunction(id="b", name="b", handler=lambda: "b"))
    a_pid = runtime.execute("a").worker_pid

    b = runtime.execute("b")

    assert b.value == "b" and b.cold_start
    wait_for(lambda: pid_is_gone(a_pid), 2.0, "a's idle worker was not evicted")
    assert runtime.execute("a").cold_start is True


# -- concurrency and queueing -----------------------------------------------------------------


def test_concurrency_limits_parallel_invocations(runtime: EdgeRuntime) -> None:
    """A function with concurrency=2 invoked from 4 threads runs 2 at a time, never more."""
    runtime.deploy(
        EdgeFunction(id="f", name="f", handler=_make_interval(), concurrency=2, timeout_seconds=10)
    )
    results = run_threads(4, lambda i: runtime.invoke("f", 0.4))

    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    assert max_overlap(results) == 2, f"intervals: {results}"


def test_concurrency_one_serialises(runtime: EdgeRuntime) -> None:
    """The default concurrency of 1 never runs two invocations of a function at once."""
    runtime.deploy(EdgeFunction(id="f", name="f", handler=_make_interval(), timeout_seconds=10))
    results = run_threads(3, lambda i: runtime.invoke("f", 0.1))
    assert max_overlap(results) == 1, f"intervals: {results}"


def test_full_queue_raises_overloaded_quickly(make_runtime: RuntimeFactory) -> None:
    """With concurrency 1 and max_queue=1, a third concurrent invocation is refused at once."""
    runtime = make_runtime(max_queue=1)
    runtime.deploy(EdgeFunction(id="f", name="f", handler=_make_interval(), timeout_seconds=10))
    started = time.monotonic()
    refused_at: list[float] = []

    def call(i: int) -> Any:
        try:
            return runtime.invoke("f", 0.8)
        except Overloaded:
            refused_at.append(time.monotonic() - started)
            raise

    results = run_threads(4, call)

    overloaded = [r for r in results if isinstance(r, Overloaded)]
    served = [r for r in results if isinstance(r, tuple)]
    assert len(served) == 2 and len(overloaded) == 2, results
    assert all(e.type == "overloaded" for e in overloaded)
    assert max(refused_at) < 0.5, f"Overloaded took {refused_at}s (it should not wait)"
    assert runtime.metrics.error_count(function_id="f") == 2


def test_concurrent_invokes_get_their_own_results(runtime: EdgeRuntime) -> None:
    """Eight threads invoking an echo handler each get their own argument back (no cross-talk)."""
    runtime.deploy(EdgeFunction(id="echo", name="echo", handler=lambda x: x, concurrency=4))
    payloads = [{"thread": i, "data": "x" * (i * 1000)} for i in range(8)]

    results = run_threads(8, lambda i: [runtime.invoke("echo", payloads[i]) for _ in range(5)])

    for i, got in enumerate(results):
        assert got == [payloads[i]] * 5, f"thread {i} got someone else's result"
    assert len({r.request_id for r in runtime.metrics.records}) == 40
    assert len(runtime.pool.worker_pids()) <= 4 + 1  # concurrency + one prestarted


# -- the pool on its own (the daemon's JSON codec) ---------------------------------------------


@pytest.fixture
def json_pool() -> Iterator[WorkerPool]:
    with leak_check():
        pool = WorkerPool(codec="json", prestart=0, sys_path=[])
        pool.start()
        try:
            yield pool
        finally:
            pool.close()
        assert pool.worker_pids() == []


def _package_config(entrypoint: str, **kwargs: Any) -> FunctionConfig:
    return FunctionConfig(
        function_id="pkg",
        memory_mb=64,
        timeout_s=5,
        kind="package",
        path=str(HANDLERS_PKG),
        entrypoint=entrypoint,
        **kwargs,
    )


def test_json_pool_runs_packaged_handler(json_pool: WorkerPool) -> None:
    """The daemon's configuration (JSON codec, packaged code) returns JSON values."""
    json_pool.register(_package_config("sensor_handlers:fahrenheit"))
    result = json_pool.invoke("pkg", ({"temperature": 25},), request_id="r-1")

    assert result.value == {"processed": True, "value": 77.0}
    assert result.cold_start is True
    assert result.rss_kb > 0
    assert json_pool.functions() == ["pkg"]


def test_json_pool_handler_error_has_no_unpickled_cause(json_pool: WorkerPool) -> None:
    """With the JSON codec nothing from the worker is unpickled; builtins are rebuilt by name."""
    json_pool.register(_package_config("sensor_handlers:fahrenheit"))
    with pytest.raises(HandlerError, match="KeyError") as info:
        json_pool.invoke("pkg", ({"humidity": 3},))
    assert isinstance(info.value.__cause__, KeyError)
    assert "temperature" in info.value.remote_traceback  # type: ignore[attr-defined]


def test_json_pool_non_json_result_is_a_handler_error(json_pool: WorkerPool) -> None:
    """A result that JSON cannot carry is a HandlerError; the worker stays usable."""
    json_pool.register(_package_config("sensor_handlers:Gauge"))
    with pytest.raises(HandlerError, match="JSON"):
        json_pool.invoke("pkg")
    json_pool.register(_package_config("sensor_handlers:Gauge.read"))
    assert json_pool.invoke("pkg", (1.0,)).value == 42.0


def test_pool_unregister_and_unknown(json_pool: WorkerPool) -> None:
    """unregister returns whether the function existed; invoking it after is FunctionNotFound."""
    json_pool.register(_package_config("sensor_handlers:where"))
    assert json_pool.invoke("pkg").value.endswith("sensor_handlers.py")
    assert json_pool.unregister("pkg") is True
    assert json_pool.unregister("pkg") is False
    with pytest.raises(FunctionNotFound, match="Function not found"):
        json_pool.invoke("pkg")
    assert json_pool.worker_pids() == []


def test_pool_construction_starts_nothing() -> None:
    """Building a pool (or a runtime) spawns no process and no thread until it is used."""
    with leak_check():
        threads_before = threading.active_count()
        pool = WorkerPool(prestart=2)
        assert pool.worker_pids() == []
        assert threading.active_count() == threads_before
        pool.close()


def test_leak_check_catches_a_leaked_child_and_fd(tmp_path: Path) -> None:
    """The leak check itself fails on a child left running and on an fd left open."""
    import subprocess

    with pytest.raises(pytest.fail.Exception, match="leaked"), leak_check(timeout=0.2):
        zombie = subprocess.Popen(["sleep", "30"])
        zombie.kill()  # killed but not reaped: a zombie is a leak too
    zombie.wait()

    with pytest.raises(AssertionError, match="fds leaked"), leak_check(timeout=0.2):
        fd = os.open(tmp_path, os.O_RDONLY)
    os.close(fd)


# -- a failed load with callers queued behind it ------------------------------------------------

#: A module that says it is loading, waits for the test's go, then fails to import (with
#: ``die_once``: SIGKILLs its own worker instead, the first time only, as ``kill -9`` from
#: outside would while a pre-started interpreter loads it).
_GATED_MODULE = """\
import os
import signal
import time

open({mark!r}, 'w').close()
while not os.path.exists({gate!r}):
    time.sleep(0.005)
if {die_once!r}:
    if not os.path.exists({died!r}):
        open({died!r}, 'w').close()
        os.kill(os.getpid(), signal.SIGKILL)
else:
    raise ImportError('broken on purpose')


def handler(x):
    return x
"""


def _gated_function(tmp_path: Path, *, die_once: bool) -> tuple[FunctionConfig, Path, Path]:
    """A package function whose load waits for ``gate``; (config, mark, gate)."""
    code = tmp_path / "code"
    code.mkdir()
    mark, gate, died = tmp_path / "loading", tmp_path / "go", tmp_path / "died"
    (code / "gated.py").write_text(
        _GATED_MODULE.format(mark=str(mark), gate=str(gate), died=str(died), die_once=die_once)
    )
    config = FunctionConfig(
        function_id="gated",
        memory_mb=128,
        timeout_s=30,
        kind="package",
        path=str(code),
        entrypoint="gated:handler",
    )
    return config, mark, gate


def test_callers_queued_behind_a_failed_load_are_all_answered_at_once(tmp_path: Path) -> None:
    """A cold start fails to load while two callers wait for the function's only place: both
    get the load error at once. The first caller woken raised it without passing the wake-up
    on, so the other waited out its whole queue timeout (a daemon invoke unanswered for 60 s
    after its worker was SIGKILLed mid-burst)."""
    config, mark, gate = _gated_function(tmp_path, die_once=False)
    with leak_check():
        pool = WorkerPool(codec="json", prestart=0, sys_path=[])
        pool.start()
        try:
            pool.register(config)

            def call() -> Any:
                return pool.invoke("gated", (1,), queue_timeout=60)

            loading = in_thread(call)
            wait_for(mark.exists, 10, "the cold start never began loading the handler")
            queued = [in_thread(call), in_thread(call)]
            slot = pool._slots["gated"]
            wait_for(lambda: slot.waiting == 2, 10, "the two callers never queued")
            # A long backoff after this failure (as after several in a row), so that whoever
            # is woken sees the load error however slowly this machine schedules it.
            slot.load_failures = 10
            gate.touch()
            futures = [loading, *queued]
            wait_for(
                lambda: all(f.done() for f in futures),
                10,
                "a caller was still waiting 10 s after the load failed (queue timeout: 60 s)",
            )
            for future in futures:
                with pytest.raises(HandlerError, match="broken on purpose"):
                    future.result()
        finally:
            pool.close()


def test_prestarted_worker_killed_while_loading_is_not_a_load_failure(tmp_path: Path) -> None:
    """The pre-started interpreter a cold start took is SIGKILLed while it loads the handler:
    the load is retried in a fresh worker and the invocation answers. It counted as a failed
    load: the caller got worker_crashed, and so did every caller of the function for the
    backoff after it (28 of a burst of 40 when every worker was killed mid-burst)."""
    config, _, gate = _gated_function(tmp_path, die_once=True)
    with leak_check():
        pool = WorkerPool(codec="json", prestart=1, sys_path=[])
        pool.start()
        try:
            assert pool.wait_prestarted(), "the prestart pool never filled"
            prestarted = set(pool.worker_pids())
            pool.register(config)
            gate.touch()
            result = pool.invoke("gated", (7,))
            assert result.value == 7 and result.cold_start
            assert result.worker_pid not in prestarted, "loaded in the killed worker?"
            assert pool.invoke("gated", (8,)).value == 8  # no load error left behind
        finally:
            pool.close()
