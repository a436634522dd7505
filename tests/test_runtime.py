"""EdgeRuntime enforces its limits with real worker processes and real signals.

Memory (RLIMIT_DATA), time-outs (SIGKILL to the process group at the deadline), crashes,
the worker's environment, rlimits and fds, the kinds of handler it can run, and close().
Every test runs inside a leak check: after the runtime is closed no worker and no fd remains.

Handlers are defined inside the tests (or built by the ``_make_*`` factories) so cloudpickle
ships them by value: a module-level function here would make each worker import this module,
pytest included, inside its memory limit.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from procutil import (
    HANDLERS_PKG,
    MIB,
    RuntimeFactory,
    child_pids,
    in_thread,
    leak_check,
    pid_is_gone,
    run_script,
)

from agent import (
    DeploymentRejected,
    EdgeExecutionError,
    EdgeFunction,
    EdgeNode,
    EdgeRuntime,
    FunctionNotFound,
    FunctionTimeout,
    HandlerError,
    MemoryLimitExceeded,
    PackagedHandler,
    WorkerCrashed,
)
from agent.exec.pool import BASE_ENV, WorkerLimits, WorkerPool
from testing.wait import wait_for

#: Crash tests use a generous memory_mb so that a crash is never mistaken for a memory death
#: by the RSS heuristic (see test_crash_is_not_memory_when_parent_rss_was_high).
CRASH_MEMORY_MB = 512
#: Slack allowed on top of timeout_seconds for the kill, the reap and the reply.
TIMEOUT_SLACK_S = 0.1


@pytest.fixture
def make_runtime() -> Iterator[RuntimeFactory]:
    with RuntimeFactory() as factory:
        yield factory


@pytest.fixture
def runtime(make_runtime: RuntimeFactory) -> EdgeRuntime:
    return make_runtime()


def _make_allocator() -> Callable[[float], int]:
    def allocate(mb: float) -> int:
        buf = bytearray(int(mb * 1024 * 1024))
        return len(buf)

    return allocate


def _make_crashy() -> Callable[..., str]:
    def crashy(mode: str = "", marker: str = "") -> str:
        if mode == "exit":
            os._exit(3)
        if mode == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if mode == "sleep":
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(60)
        return "alive"

    return crashy


def _make_napper() -> Callable[[float], float]:
    def nap(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    return nap


# -- memory ------------------------------------------------------------------------------------


def test_allocation_within_memory_limit_succeeds(runtime: EdgeRuntime) -> None:
    """A handler may use three quarters of its memory_mb."""
    runtime.deploy(EdgeFunction(id="alloc", name="alloc", handler=_make_allocator(), memory_mb=64))
    assert runtime.invoke("alloc", 0.75 * 64) == 48 * MIB


def test_allocation_over_memory_limit_raises_and_worker_is_replaced(runtime: EdgeRuntime) -> None:
    """Allocating twice memory_mb raises MemoryLimitExceeded; the next call gets a new worker."""
    runtime.deploy(EdgeFunction(id="alloc", name="alloc", handler=_make_allocator(), memory_mb=64))
    first = runtime.execute("alloc", (1,))

    with pytest.raises(MemoryLimitExceeded) as info:
        runtime.invoke("alloc", 2 * 64)

    assert info.value.type == "memory_exceeded"
    assert isinstance(info.value, MemoryError)
    assert isinstance(info.value, EdgeExecutionError)
    assert "alloc" in str(info.value)
    after = runtime.execute("alloc", (1,))
    assert after.value == MIB
    assert after.worker_pid != first.worker_pid
    assert after.cold_start
    assert pid_is_gone(first.worker_pid)
    assert runtime.metrics.records[-2].error_type == "memory_exceeded"


def test_many_small_allocations_hit_the_memory_limit(runtime: EdgeRuntime) -> None:
    """Growing a list of 1 MiB bytes objects past memory_mb raises MemoryLimitExceeded."""

    def hoard(chunks: int) -> int:
        kept = []
        for _ in range(chunks):
            kept.append(b"\x01" * (1 << 20))
        return len(kept)

    runtime.deploy(EdgeFunction(id="hoard", name="hoard", handler=hoard, memory_mb=64))
    assert runtime.invoke("hoard", 16) == 16

    with pytest.raises(MemoryLimitExceeded):
        runtime.invoke("hoard", 3 * 64)

    assert runtime.invoke("hoard", 1) == 1


def test_handler_with_a_few_threads_within_the_limit_works(runtime: EdgeRuntime) -> None:
    """Four threads alive at once (each with its stack) fit in memory_mb=64."""

    def fan_out(n: int) -> list[int]:

        barrier = threading.Barrier(n + 1)
        results: list[int] = []

        def work(i: int) -> None:
            barrier.wait()
            results.append(sum(range(i * 1000)))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for thread in threads:
            thread.start()
        barrier.wait()
        for thread in threads:
            thread.join()
        return sorted(results)

    runtime.deploy(EdgeFunction(id="fan", name="fan", handler=fan_out, memory_mb=64))
    assert runtime.invoke("fan", 4) == sorted(sum(range(i * 1000)) for i in range(4))


def test_idle_threads_do_not_exhaust_memory_limit(runtime: EdgeRuntime) -> None:
    """32 threads that only wait on a barrier failed with "can't start new thread" at
    memory_mb=64: RLIMIT_DATA counted each thread's 8 MiB stack reservation."""

    def fan_out(n: int) -> int:

        barrier = threading.Barrier(n + 1)
        threads = [threading.Thread(target=barrier.wait) for _ in range(n)]
        for thread in threads:
            thread.start()
        barrier.wait()
        for thread in threads:
            thread.join()
        return n

    runtime.deploy(EdgeFunction(id="fan", name="fan", handler=fan_out, memory_mb=64))
    assert runtime.invoke("fan", 32) == 32


# -- time-outs ---------------------------------------------------------------------------------


def test_timeout_on_warm_worker_is_enforced_promptly(runtime: EdgeRuntime) -> None:
    """A handler sleeping past timeout_seconds fails within timeout + 100 ms."""
    runtime.deploy(EdgeFunction(id="nap", name="nap", handler=_make_napper(), timeout_seconds=0.5))
    warm = runtime.execute("nap", (0,))

    started = time.monotonic()
    with pytest.raises(FunctionTimeout) as info:
        runtime.invoke("nap", 30)
    elapsed = time.monotonic() - started

    assert 0.5 <= elapsed < 0.5 + TIMEOUT_SLACK_S, f"timed out after {elapsed:.3f}s"
    assert isinstance(info.value, TimeoutError)
    assert info.value.type == "timeout"
    assert pid_is_gone(warm.worker_pid), "the timed-out worker was not killed and reaped"
    after = runtime.execute("nap", (0,))
    assert after.value == 0
    assert after.worker_pid != warm.worker_pid
    assert runtime.metrics.function_stats("nap")["timeouts"] == 1


def test_timeout_kills_handler_that_ignores_sigterm(runtime: EdgeRuntime) -> None:
    """A busy loop that ignores SIGTERM is still killed at the deadline (SIGKILL)."""

    def stubborn(spin: bool) -> str:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while spin:
            pass
        return "ready"

    runtime.deploy(EdgeFunction(id="stub", name="stub", handler=stubborn, timeout_seconds=0.5))
    warm = runtime.execute("stub", (False,))

    started = time.monotonic()
    with pytest.raises(FunctionTimeout):
        runtime.invoke("stub", True)
    elapsed = time.monotonic() - started

    assert elapsed < 0.5 + TIMEOUT_SLACK_S, f"timed out after {elapsed:.3f}s"
    assert pid_is_gone(warm.worker_pid)
    assert runtime.invoke("stub", False) == "ready"


def test_timeout_kills_grandchildren(runtime: EdgeRuntime, tmp_path: Path) -> None:
    """A timeout kills the worker's whole process group, so a grandchild it started dies too."""
    pidfile = tmp_path / "grandchild.pid"

    def spawn_and_wait(path: str = "") -> str:
        if not path:
            return "idle"
        child = subprocess.Popen(["sleep", "60"])
        with open(path, "w") as f:
            f.write(str(child.pid))
        time.sleep(60)
        return "unreachable"

    runtime.deploy(
        EdgeFunction(id="spawner", name="spawner", handler=spawn_and_wait, timeout_seconds=0.5)
    )
    with pytest.raises(FunctionTimeout):
        runtime.invoke("spawner", str(pidfile))

    grandchild = int(pidfile.read_text())
    wait_for(
        lambda: pid_is_gone(grandchild),
        2.0,
        f"grandchild {grandchild} (sleep 60) survived its worker's timeout",
    )
    assert runtime.invoke("spawner") == "idle"


def test_timeout_counts_from_the_invocation_not_the_queue(make_runtime: RuntimeFactory) -> None:
    """An invocation queued behind another is not timed out for the time it waited."""
    runtime = make_runtime()
    runtime.deploy(EdgeFunction(id="nap", name="nap", handler=_make_napper(), timeout_seconds=1))
    runtime.invoke("nap", 0)
    first = in_thread(lambda: runtime.invoke("nap", 0.6))
    second = in_thread(lambda: runtime.invoke("nap", 0.6))
    # One of them waits ~0.6 s for the worker, then runs 0.6 s: 1.2 s > timeout, yet in time.
    assert first.result(timeout=10) == 0.6
    assert second.result(timeout=10) == 0.6


# -- crashes -----------------------------------------------------------------------------------


def test_exit_in_handler_raises_worker_crashed_with_exit_code(runtime: EdgeRuntime) -> None:
    """os._exit(3) in a handler is a WorkerCrashed carrying exit code 3."""
    runtime.deploy(
        EdgeFunction(id="crash", name="c", handler=_make_crashy(), memory_mb=CRASH_MEMORY_MB)
    )
    with pytest.raises(WorkerCrashed) as info:
        runtime.invoke("crash", "exit")

    assert info.value.exit_code == 3
    assert info.value.signal is None
    assert "3" in str(info.value)
    assert info.value.type == "worker_crashed"
    assert runtime.invoke("crash") == "alive"


def test_segfault_in_handler_raises_worker_crashed_with_signal(runtime: EdgeRuntime) -> None:
    """A worker killed by SIGSEGV is a WorkerCrashed carrying signal 11."""
    runtime.deploy(
        EdgeFunction(id="crash", name="c", handler=_make_crashy(), memory_mb=CRASH_MEMORY_MB)
    )
    runtime.invoke("crash")
    with pytest.raises(WorkerCrashed) as info:
        runtime.invoke("crash", "segv")

    assert info.value.signal == signal.SIGSEGV
    assert info.value.exit_code is None
    assert "SIGSEGV" in str(info.value)
    assert runtime.invoke("crash") == "alive"


def test_sigkill_from_outside_raises_worker_crashed(runtime: EdgeRuntime, tmp_path: Path) -> None:
    """A worker SIGKILLed by someone else mid-invocation is a WorkerCrashed with signal 9."""
    runtime.deploy(
        EdgeFunction(
            id="crash",
            name="c",
            handler=_make_crashy(),
            memory_mb=CRASH_MEMORY_MB,
            timeout_seconds=10,
        )
    )
    pid = runtime.execute("crash").worker_pid
    marker = tmp_path / "running"
    pending = in_thread(lambda: runtime.invoke("crash", "sleep", str(marker)))
    wait_for(marker.exists, 5.0, "the handler never started sleeping")
    assert int(marker.read_text()) == pid

    os.kill(pid, signal.SIGKILL)

    with pytest.raises(WorkerCrashed) as info:
        pending.result(timeout=5)
    assert info.value.signal == signal.SIGKILL
    after = runtime.execute("crash")
    assert after.value == "alive"
    assert after.worker_pid != pid


def test_idle_worker_killed_from_outside_is_not_a_raw_frame_error(runtime: EdgeRuntime) -> None:
    """A warm worker that died while idle (OOM killer, operator) must not leak a FrameError."""
    runtime.deploy(
        EdgeFunction(id="crash", name="c", handler=_make_crashy(), memory_mb=CRASH_MEMORY_MB)
    )
    pid = runtime.execute("crash").worker_pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid not in child_pids() or _is_zombie(pid), 5.0, f"worker {pid} did not die")

    with contextlib.suppress(WorkerCrashed):  # acceptable: reported as the crash it was
        assert runtime.invoke("crash") == "alive"  # best: a fresh worker answers
    assert runtime.invoke("crash") == "alive"


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


#: A script whose process peaks at ~300 MB RSS before it starts a runtime (as a busy agent may).
BIG_PARENT = """\
import os
from agent import EdgeNode, EdgeFunction, EdgeRuntime, EdgeExecutionError

ballast = b"\\x01" * (300 << 20)  # touched: the parent's peak RSS is now above 300 MB
del ballast

def crash(code):
    if code:
        os._exit(code)
    return "ok"

with EdgeRuntime(EdgeNode(id="gw", name="gw")) as runtime:
    runtime.deploy(EdgeFunction(id="crash", name="crash", handler=crash, memory_mb=128))
    print(runtime.execute("crash", (0,)).rss_kb)
    try:
        runtime.invoke("crash", 3)
    except EdgeExecutionError as exc:
        print(type(exc).__name__)
"""


def _run_big_parent(tmp_path: Path) -> tuple[int, str]:
    done = run_script(BIG_PARENT, tmp_path)
    assert done.returncode == 0, done.stderr
    rss_kb, error = done.stdout.split()
    return int(rss_kb), error


def test_crash_is_not_memory_when_parent_rss_was_high(tmp_path: Path) -> None:
    """os._exit(3) is a WorkerCrashed even when the parent process once used 300 MB."""
    _, error = _run_big_parent(tmp_path)
    assert error == "WorkerCrashed"


def test_peak_rss_is_the_workers_own(tmp_path: Path) -> None:
    """A trivial handler's peak RSS is the worker's (tens of MB), not its parent's 300 MB."""
    rss_kb, _ = _run_big_parent(tmp_path)
    assert 0 < rss_kb < 100 * 1024


def test_peak_rss_shows_memory_a_handler_keeps(runtime: EdgeRuntime) -> None:
    """A success reads the worker's RSS at most once a millisecond (back-to-back fast calls
    report the peak seen so far); a call that ran longer than that always reads it: the
    32 MiB it keeps is in its own result, and the peak never goes down afterwards."""

    def grow(mib: int, kept: list[bytearray] = []) -> int:  # noqa: B006 (kept across calls)
        import time

        start = time.monotonic()
        if mib:
            kept.append(bytearray(mib << 20))  # zero-filled: every page touched
        while time.monotonic() - start < 0.002:  # longer than the read interval
            pass
        return len(kept)

    runtime.deploy(EdgeFunction(id="grow", name="grow", handler=grow, memory_mb=256))
    before = runtime.execute("grow", (0,)).rss_kb
    grown = runtime.execute("grow", (32,))
    assert grown.value == 1
    assert grown.rss_kb >= before + 30 * 1024, (before, grown.rss_kb)
    fast = [runtime.execute("grow", (0,)).rss_kb for _ in range(20)]
    assert min(fast) >= grown.rss_kb, (grown.rss_kb, fast)


def test_crash_with_small_memory_limit_is_not_memory(runtime: EdgeRuntime) -> None:
    """os._exit(3) with memory_mb=16 is a WorkerCrashed with exit code 3."""
    runtime.deploy(EdgeFunction(id="crash", name="c", handler=_make_crashy(), memory_mb=16))
    assert runtime.invoke("crash") == "alive"
    with pytest.raises(WorkerCrashed) as info:
        runtime.invoke("crash", "exit")
    assert info.value.exit_code == 3


def test_worker_writing_garbage_to_its_pipe_is_killed(runtime: EdgeRuntime) -> None:
    """A worker that breaks the frame protocol is killed and reported, never trusted."""

    def scribble(write: bool) -> str:
        if write:
            # The bootstrap's argv: agent root, read fd, write fd (the reply pipe), codec.
            os.write(int(sys.argv[3]), b"\xff" * 64)
            time.sleep(5)
        return "quiet"

    runtime.deploy(EdgeFunction(id="scribble", name="s", handler=scribble, timeout_seconds=10))
    pid = runtime.execute("scribble", (False,)).worker_pid
    started = time.monotonic()
    with pytest.raises(WorkerCrashed, match="protocol"):
        runtime.invoke("scribble", True)
    assert time.monotonic() - started < 2.0, "the parent waited instead of killing at once"
    assert pid_is_gone(pid)
    assert runtime.invoke("scribble", False) == "quiet"


def test_print_in_a_handler_does_not_corrupt_the_channel(runtime: EdgeRuntime) -> None:
    """Whatever a handler prints goes to stderr, never into the reply pipe."""

    def chatty(n: int) -> int:
        print("x" * n)
        print("\xff\x00 not a frame", flush=True)
        return n

    runtime.deploy(EdgeFunction(id="chatty", name="c", handler=chatty))
    assert runtime.invoke("chatty", 200_000) == 200_000
    assert runtime.invoke("chatty", 1) == 1


def test_large_arguments_and_results_round_trip(runtime: EdgeRuntime) -> None:
    """Several MiB each way cross the pipe intact, in both directions at once."""
    payload = bytes(range(256)) * (8 * 4096)  # 8 MiB
    runtime.deploy(EdgeFunction(id="rev", name="rev", handler=lambda b: b[::-1] + b[:1024]))
    assert runtime.invoke("rev", payload) == payload[::-1] + payload[:1024]


# -- environment, rlimits, fds -----------------------------------------------------------------


def test_environment_is_clean_base_plus_function_entries(
    runtime: EdgeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker sees its function's environment on a clean base, none of the agent's."""
    monkeypatch.setenv("EDGE_TEST_SECRET", "hunter2")
    runtime.deploy(
        EdgeFunction(
            id="env",
            name="env",
            handler=lambda: dict(os.environ),
            environment={"SENSOR_BUS": "i2c-1", "LANG": "en_US.UTF-8"},
        )
    )
    env = runtime.invoke("env")

    assert env["SENSOR_BUS"] == "i2c-1"
    assert env["LANG"] == "en_US.UTF-8", "the function's environment goes on top of the base"
    assert env["PATH"] == BASE_ENV["PATH"]
    assert "EDGE_TEST_SECRET" not in env
    assert set(env) <= set(BASE_ENV) | {"SENSOR_BUS"}, f"unexpected variables: {sorted(env)}"


def test_worker_rlimits_are_applied(runtime: EdgeRuntime) -> None:
    """No core dumps, RLIMIT_NOFILE 1024 and RLIMIT_FSIZE from the default WorkerLimits."""

    def limits() -> dict[str, tuple[int, int]]:
        return {
            name: resource.getrlimit(getattr(resource, name))
            for name in ("RLIMIT_CORE", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_DATA")
        }

    runtime.deploy(EdgeFunction(id="lim", name="lim", handler=limits, memory_mb=64))
    got = runtime.invoke("lim")

    assert got["RLIMIT_CORE"][0] == 0
    assert got["RLIMIT_NOFILE"][0] == WorkerLimits().nofile == 1024
    assert got["RLIMIT_FSIZE"][0] == WorkerLimits().fsize_bytes
    data_soft = got["RLIMIT_DATA"][0]
    assert data_soft != resource.RLIM_INFINITY
    assert 64 * MIB < data_soft < 64 * MIB + 256 * MIB, "RLIMIT_DATA is memory_mb + the base"


def test_custom_worker_limits_are_enforced(make_runtime: RuntimeFactory, tmp_path: Path) -> None:
    """WorkerLimits(fsize_bytes=...) makes a larger write fail in the handler, not the worker."""
    runtime = make_runtime(limits=WorkerLimits(nofile=64, fsize_bytes=MIB))

    def write(path: str, size: int) -> int:
        with open(path, "wb") as f:
            return f.write(b"\x00" * size)

    runtime.deploy(EdgeFunction(id="w", name="w", handler=write))
    target = str(tmp_path / "out.bin")
    assert runtime.invoke("w", target, 1024) == 1024

    with pytest.raises(HandlerError) as info:
        runtime.invoke("w", target, 2 * MIB)

    assert isinstance(info.value.__cause__, OSError)
    assert runtime.invoke("w", target, 10) == 10
    runtime.deploy(
        EdgeFunction(
            id="nofile", name="n", handler=lambda: resource.getrlimit(resource.RLIMIT_NOFILE)
        )
    )
    assert runtime.invoke("nofile")[0] == 64


def test_worker_inherits_no_fds(runtime: EdgeRuntime, tmp_path: Path) -> None:
    """Only stdin/stdout/stderr and the two pipe fds are open in a worker: nothing inherited."""
    secret = tmp_path / "inheritable.txt"
    secret.write_text("do not leak")
    fd = os.open(secret, os.O_RDONLY)
    os.set_inheritable(fd, True)
    try:

        def list_fds() -> dict[int, str]:
            fds = {}
            for name in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):  # the fd listdir used is closed by now
                    fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
            return fds

        runtime.deploy(EdgeFunction(id="fds", name="fds", handler=list_fds))
        fds = runtime.invoke("fds")
    finally:
        os.close(fd)

    assert str(secret) not in fds.values(), f"the test's inheritable fd leaked: {fds}"
    assert {0, 1, 2} <= set(fds)
    # The worker's own /proc/self/statm (opened after start, for per-invocation peak RSS)
    # is not inherited; everything else beyond 0-2 must be the two pipes to the agent.
    extra = {
        n: target
        for n, target in fds.items()
        if n > 2 and not (target.startswith("/proc/") and target.endswith("/statm"))
    }
    assert len(extra) == 2, f"expected only the two pipe fds beyond 0-2, got {fds}"
    assert all(target.startswith("pipe:") for target in extra.values()), fds


# -- kinds of handler --------------------------------------------------------------------------


def double_by_reference(x: int) -> tuple[int, str, bool]:
    """Module level: cloudpickle ships it by reference, so the worker imports this module."""
    return 2 * x, __name__, __name__ in sys.modules


def test_lambda_handler(runtime: EdgeRuntime) -> None:
    """A lambda is shipped by value and runs in the worker."""
    runtime.deploy(EdgeFunction(id="lam", name="lam", handler=lambda x, y=1: x * 10 + y))
    assert runtime.invoke("lam", 4) == 41
    assert runtime.invoke("lam", 4, y=7) == 47


def test_closure_handler_sees_captured_local(runtime: EdgeRuntime) -> None:
    """A closure carries the local variables it captured."""
    factor = 3.5
    offsets = {"a": 1}

    def scaled(x: float) -> float:
        return x * factor + offsets["a"]

    runtime.deploy(EdgeFunction(id="clo", name="clo", handler=scaled))
    assert runtime.invoke("clo", 2) == 8.0


def test_module_function_handler_by_reference(runtime: EdgeRuntime) -> None:
    """A function of an importable module is imported by the worker, not copied."""
    runtime.deploy(EdgeFunction(id="ref", name="ref", handler=double_by_reference))
    assert runtime.invoke("ref", 21) == (42, __name__, True)


def test_packaged_handler_from_directory(runtime: EdgeRuntime) -> None:
    """PackagedHandler(path=dir, entrypoint=module:attr) loads code from that directory."""
    runtime.deploy(
        EdgeFunction.from_package(
            "pkg", "pkg", str(HANDLERS_PKG), "sensor_handlers:fahrenheit", memory_mb=64
        )
    )
    runtime.deploy(
        EdgeFunction(
            id="where",
            name="w",
            handler=PackagedHandler(str(HANDLERS_PKG), "sensor_handlers:where"),
        )
    )
    runtime.deploy(
        EdgeFunction(
            id="nested",
            name="n",
            handler=PackagedHandler(str(HANDLERS_PKG), "sensor_handlers:Gauge.read"),
        )
    )

    assert runtime.invoke("pkg", {"temperature": 25}) == {"processed": True, "value": 77.0}
    assert runtime.invoke("where") == str(HANDLERS_PKG / "sensor_handlers.py")
    assert runtime.invoke("nested", 0.5) == 21.0


def test_packaged_handler_from_zip(runtime: EdgeRuntime, tmp_path: Path) -> None:
    """A zip of the package directory works as the handler path (zipimport)."""
    archive = tmp_path / "handlers.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for source in sorted(HANDLERS_PKG.rglob("*.py")):
            zf.write(source, source.relative_to(HANDLERS_PKG).as_posix())
    runtime.deploy(
        EdgeFunction.from_package("zip", "zip", str(archive), "sensor_handlers:fahrenheit")
    )
    runtime.deploy(EdgeFunction.from_package("where", "w", str(archive), "sensor_handlers:where"))

    assert runtime.invoke("zip", {"temperature": 100}) == {"processed": True, "value": 212.0}
    assert runtime.invoke("where").startswith(str(archive))


def test_packaged_handler_environment(runtime: EdgeRuntime) -> None:
    """A packaged handler sees its function's environment too."""
    runtime.deploy(
        EdgeFunction.from_package(
            "env", "env", str(HANDLERS_PKG), "sensor_handlers:env", environment={"ZONE": "b"}
        )
    )
    assert runtime.invoke("env", "ZONE") == "b"


def test_packaged_handler_missing_module_raises_handler_error(runtime: EdgeRuntime) -> None:
    """An entrypoint whose module does not exist fails with a HandlerError naming the module."""
    runtime.deploy(
        EdgeFunction.from_package("miss", "m", str(HANDLERS_PKG), "no_such_sensor_module:run")
    )
    with pytest.raises(HandlerError, match="no_such_sensor_module"):
        runtime.invoke("miss")
    with pytest.raises(HandlerError, match="no_such_sensor_module"):
        runtime.invoke("miss")  # again (rate-limited reload): same error, no hot respawn loop


def test_packaged_handler_missing_attr_raises_handler_error(runtime: EdgeRuntime) -> None:
    """An entrypoint whose attribute does not exist fails with a HandlerError naming it."""
    runtime.deploy(
        EdgeFunction.from_package("miss", "m", str(HANDLERS_PKG), "sensor_handlers:no_such_attr")
    )
    with pytest.raises(HandlerError, match="no_such_attr"):
        runtime.invoke("miss")


def test_packaged_handler_needs_module_colon_attr() -> None:
    """An entrypoint without ``module:attr`` is refused when the handler is built."""
    with pytest.raises(ValueError, match="module:attr"):
        PackagedHandler(str(HANDLERS_PKG), "sensor_handlers")


def test_handler_that_cannot_be_shipped_is_rejected_at_deploy(runtime: EdgeRuntime) -> None:
    """A closure over something unpicklable is refused by deploy, not at the first invoke."""

    lock = threading.Lock()

    def locked() -> bool:
        with lock:
            return True

    with pytest.raises(DeploymentRejected, match="locked"):
        runtime.deploy(EdgeFunction(id="locked", name="locked", handler=locked))
    assert runtime.list_functions() == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("memory_mb", 0), ("memory_mb", 1.5), ("timeout_seconds", 0), ("concurrency", 0)],
)
def test_invalid_limits_are_rejected_at_deploy(
    runtime: EdgeRuntime, field: str, value: Any
) -> None:
    """Limits that cannot be enforced are refused with DeploymentRejected naming the field."""
    fn = EdgeFunction(id="bad", name="bad", handler=lambda: None)
    setattr(fn, field, value)
    with pytest.raises(DeploymentRejected, match=field):
        runtime.deploy(fn)


def test_unpicklable_argument_raises_bad_request(runtime: EdgeRuntime) -> None:
    """An argument that cannot be sent to the worker is a BadRequest (a ValueError)."""

    from agent import BadRequest

    runtime.deploy(EdgeFunction(id="echo", name="echo", handler=lambda x: x))
    with pytest.raises(BadRequest):
        runtime.invoke("echo", threading.Lock())
    assert runtime.metrics.records[-1].error_type == "bad_request"


def test_result_the_caller_cannot_unpickle_is_a_handler_error(runtime: EdgeRuntime) -> None:
    """A packaged handler returning an instance of its own class fails as a HandlerError."""
    runtime.deploy(
        EdgeFunction.from_package("gauge", "g", str(HANDLERS_PKG), "sensor_handlers:Gauge")
    )
    with pytest.raises(HandlerError, match="sensor_handlers"):
        runtime.invoke("gauge")
    assert runtime.metrics.records[-1].error_type == "handler_error"


# -- close -------------------------------------------------------------------------------------


def test_close_reaps_every_worker_after_timeouts_crashes_and_concurrency(tmp_path: Path) -> None:
    """close() leaves no worker behind, whatever happened before, and later invokes fail clearly."""
    with leak_check():
        before = child_pids()
        runtime = EdgeRuntime(EdgeNode(id="n", name="n"), prestart=2)
        runtime.deploy(
            EdgeFunction(
                id="nap", name="nap", handler=_make_napper(), timeout_seconds=0.5, concurrency=3
            )
        )
        runtime.deploy(
            EdgeFunction(id="crash", name="c", handler=_make_crashy(), memory_mb=CRASH_MEMORY_MB)
        )
        with pytest.raises(FunctionTimeout):
            runtime.invoke("nap", 5)
        with pytest.raises(WorkerCrashed):
            runtime.invoke("crash", "exit")
        results = [in_thread(lambda: runtime.invoke("nap", 0.05)) for _ in range(3)]
        assert [r.result(timeout=10) for r in results] == [0.05] * 3
        assert runtime.pool.worker_pids()

        runtime.close()

        assert child_pids() - before == set(), "close() returned before reaping its workers"
        assert runtime.pool.worker_pids() == []
        with pytest.raises(FunctionNotFound):
            runtime.invoke("nap", 0)
        runtime.close()  # idempotent


def test_with_statement_closes_the_runtime() -> None:
    """Leaving ``with EdgeRuntime(...)`` stops and reaps every worker."""
    with leak_check():
        before = child_pids()
        with EdgeRuntime(EdgeNode(id="n", name="n")) as runtime:
            runtime.deploy(EdgeFunction(id="f", name="f", handler=lambda: os.getpid()))
            pid = runtime.invoke("f")
            assert pid in child_pids()
        assert child_pids() - before == set()


def test_garbage_collected_runtime_closes_its_workers() -> None:
    """A runtime dropped without close() stops its workers when it is collected."""
    with leak_check():

        def use_and_drop() -> int:
            runtime = EdgeRuntime(EdgeNode(id="n", name="n"))
            runtime.deploy(EdgeFunction(id="f", name="f", handler=lambda: os.getpid()))
            return int(runtime.invoke("f"))

        pid = use_and_drop()
        gc.collect()
        wait_for(lambda: pid_is_gone(pid), 5.0, f"worker {pid} outlived its dropped runtime")


def test_close_during_an_invocation_ends_it_promptly(tmp_path: Path) -> None:
    """close() while a handler runs kills its worker; the invoking thread gets an error at once."""
    with leak_check():
        runtime = EdgeRuntime(EdgeNode(id="n", name="n"))
        runtime.deploy(
            EdgeFunction(id="crash", name="c", handler=_make_crashy(), memory_mb=CRASH_MEMORY_MB)
        )
        marker = tmp_path / "running"
        pending = in_thread(lambda: runtime.invoke("crash", "sleep", str(marker)))
        wait_for(marker.exists, 5.0, "the handler never started sleeping")

        started = time.monotonic()
        runtime.close()
        # Which error is racy (WorkerCrashed or a raw OSError, see the report); that it ends is not.
        with pytest.raises(Exception):  # noqa: B017
            pending.result(timeout=5)
        assert time.monotonic() - started < 2.0


REPO_ROOT = Path(__file__).resolve().parents[1]


def _interpreter_for(user: str) -> str | None:
    """A Python 3.11+ that ``user`` can run and that finds the agent as a worker would
    (this venv lives under /root on the CI machine, so nobody cannot run it; Debian's own
    /usr/bin/python3 can), or None."""
    runuser = shutil.which("runuser")
    if os.geteuid() != 0 or runuser is None:
        return None
    probe = f"import sys; sys.path.append({str(REPO_ROOT)!r}); import agent.exec.worker"
    for python in (sys.executable, "/usr/bin/python3"):
        ok = subprocess.run(
            [runuser, "-u", user, "--", python, "-I", "-c", probe],
            capture_output=True,
            cwd="/",
        )
        if ok.returncode == 0:
            return python
    return None


@pytest.mark.skipif(
    _interpreter_for("nobody") is None,
    reason="needs root and a Python 3.11 that user nobody can run",
)
def test_worker_user_runs_handlers_unprivileged() -> None:
    """With worker_user set (agent as root), handlers run with that user's uid and gid only.

    A packaged handler, so the worker's interpreter needs nothing beyond the stdlib."""
    import pwd

    # pytest's tmp_path sits under a 0700 directory: nobody could not read the code there.
    code = Path(tempfile.mkdtemp(prefix="edge-worker-user-"))
    try:
        code.chmod(0o755)
        (code / "who.py").write_text(
            "import os\n\ndef ids():\n    return os.getuid(), os.getgid()\n"
        )
        nobody = pwd.getpwnam("nobody")
        python = _interpreter_for("nobody")
        assert python is not None
        pool = WorkerPool(prestart=0, user="nobody", python=python)
        with EdgeRuntime(EdgeNode(id="n", name="n"), pool=pool) as rt:
            rt.deploy(EdgeFunction.from_package("who", "who", str(code), "who:ids"))
            assert rt.invoke("who") == (nobody.pw_uid, nobody.pw_gid)
    finally:
        shutil.rmtree(code)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_worker_that_cannot_start_is_a_worker_crash_not_a_raw_oserror(tmp_path: Path) -> None:
    """An interpreter the worker user may not run gives WorkerCrashed, and the runtime lives."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    python = private / "python"
    python.symlink_to(sys.executable)
    pool = WorkerPool(prestart=0, user="nobody", python=str(python))
    with EdgeRuntime(EdgeNode(id="n", name="n"), pool=pool) as rt:
        rt.deploy(EdgeFunction(id="f", name="f", handler=lambda: 1))
        with pytest.raises(WorkerCrashed, match="cannot start a worker"):
            rt.invoke("f")
