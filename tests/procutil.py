"""Helpers for the supervision tests: leak checks on processes and fds, threads, scripts.

Nothing here sleeps to synchronise: :func:`testing.wait.wait_for` (the harness's) polls a
condition until a monotonic deadline and fails with a message that says what did not
happen. :func:`leak_check` records
this process's children and open fds before a test and, after the runtime under test is
closed, asserts that every child it started is gone (reaped, not a zombie) and that the fd
count is back.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from agent import EdgeNode, EdgeRuntime
from testing.wait import wait_for

T = TypeVar("T")

HANDLERS_PKG = Path(__file__).resolve().parent / "handlers_pkg"
MIB = 1024 * 1024


def child_pids() -> set[int]:
    """Pids of every descendant of this process, zombies included (a zombie is a leak)."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def open_fds() -> dict[int, str]:
    """This process's open fds and what they point at."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used is gone by now
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def describe_pids(pids: set[int]) -> str:
    lines = []
    for pid in sorted(pids):
        try:
            proc = psutil.Process(pid)
            lines.append(f"  {pid} [{proc.status()}] {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"  {pid} (gone)")
    return "\n".join(lines)


def pid_is_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs: absent, or a zombie that is not our child to reap."""
    try:
        proc = psutil.Process(pid)
        return proc.status() == psutil.STATUS_ZOMBIE and proc.ppid() != os.getpid()
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def leak_check(timeout: float = 5.0) -> Iterator[None]:
    """Assert on exit that no child process and no fd opened inside the block remains."""
    children_before = child_pids()
    fds_before = open_fds()
    yield
    wait_for(
        lambda: not (child_pids() - children_before),
        timeout,
        "worker processes leaked (still children of the test process after close):\n"
        + describe_pids(child_pids() - children_before),
    )

    def fds_back() -> bool:
        return len(open_fds()) <= len(fds_before)

    if not fds_back():
        # Fail with the list of what leaked, after giving asynchronous closers a chance.
        with contextlib.suppress(pytest.fail.Exception):
            wait_for(fds_back, timeout, "fds leaked")
        leaked = {fd: target for fd, target in open_fds().items() if fds_before.get(fd) != target}
        assert fds_back(), f"fds leaked: {len(open_fds())} open, {len(fds_before)} before: {leaked}"


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Leak check around a test (use via ``pytest.mark.usefixtures``)."""
    with leak_check():
        yield


class RuntimeFactory:
    """Makes EdgeRuntimes for one test; on exit closes them all, then checks for leaks."""

    def __init__(self) -> None:
        self.runtimes: list[EdgeRuntime] = []
        self._leaks = leak_check()

    def __call__(self, node_id: str = "gw-test", **kwargs: Any) -> EdgeRuntime:
        runtime = EdgeRuntime(EdgeNode(id=node_id, name=f"node {node_id}"), **kwargs)
        self.runtimes.append(runtime)
        return runtime

    def __enter__(self) -> RuntimeFactory:
        self._leaks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for runtime in self.runtimes:
            runtime.close()
        for runtime in self.runtimes:
            assert runtime.pool.worker_pids() == [], "close() left workers in its pool"
        self._leaks.__exit__(None, None, None)


def run_script(
    source: str, workdir: Path, *, flags: Sequence[str] = (), timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a ``__main__`` script in a fresh interpreter with cwd ``workdir``."""
    script = workdir / "script.py"
    script.write_text(source)
    return subprocess.run(
        [sys.executable, *flags, str(script)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def processes_with_cwd(path: Path) -> set[int]:
    """Live processes whose working directory is ``path`` (workers inherit the runtime's cwd)."""
    wanted = str(path.resolve())
    found = set()
    for proc in psutil.process_iter(["cwd", "status"]):
        if proc.info["cwd"] == wanted and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.add(proc.pid)
    return found


def in_thread(fn: Callable[[], T]) -> concurrent.futures.Future[T]:
    """Run ``fn`` in a fresh thread; the returned future holds its value or exception."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def run_threads(n: int, target: Callable[[int], Any], timeout: float = 30.0) -> list[Any]:
    """Call ``target(i)`` from ``n`` threads released together; results (or exceptions) by i."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
        assert not thread.is_alive(), "an invoking thread never returned"
    return results


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of ``(start, end)`` intervals open at one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    best = current = 0
    for _, delta in events:  # ends sort before starts at equal times: touching is not overlap
        current += delta
        best = max(best, current)
    return best
