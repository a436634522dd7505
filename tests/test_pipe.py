"""The pipe's vocabulary (agent.exec.pipe) and the parent reading every worker exit code: real
workers made to exit with each code, and the reason the caller or the log gets for it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from procutil import in_thread, leak_check

from agent.errors import FunctionTimeout, HandlerError, MemoryLimitExceeded, WorkerCrashed
from agent.exec import pipe
from agent.exec.pool import FunctionConfig, Worker, WorkerPool
from agent.exec.pool import process as pool_process
from agent.exec.pool.sampler import Watched
from testing.wait import wait_for

DEADLINE_S = 10.0

HANDLERS = """\
import os
import time


def exit_with(code):
    os._exit(code)


def sleep(seconds):
    time.sleep(seconds)
    return seconds


def echo(value):
    return value
"""


# -- the vocabulary ----------------------------------------------------------------------------


def test_docstring_lists_every_op_and_exit_code() -> None:
    """The module docstring is the pipe's reference: every op and exit code is in it."""
    doc = pipe.__doc__ or ""
    for op in (pipe.READY, pipe.LOAD, pipe.LOADED, pipe.LOAD_FAILED, pipe.INVOKE, pipe.RESULT):
        assert f"\n    {op} " in doc, op
    assert f"\n    {pipe.EXIT} " in doc
    for code, (name, _meaning) in pipe.EXIT_CODES.items():
        if code:
            assert f"{name}" in doc and f"{code}" in doc, name


def test_exit_codes_are_distinct_and_named() -> None:
    assert len(set(pipe.EXIT_CODES)) == len(pipe.EXIT_CODES)
    for code, (name, _meaning) in pipe.EXIT_CODES.items():
        assert getattr(pipe, name) == code


def test_hot_path_invoke_decodes_to_the_invoke_message() -> None:
    """The pool's hot-path invoke header (no JSON) reads back as the plain invoke message."""
    frame = pipe.encode_frame(pipe.invoke_header("r-1"), b"blob")
    head_len, _ = pipe.parse_prefix(frame)
    header, blob = pipe.decode_body(memoryview(frame)[pipe.PREFIX_SIZE :], head_len)
    assert header == {"op": pipe.INVOKE, "request_id": "r-1"} and blob == b"blob"


def test_hot_path_result_decodes_to_the_result_message() -> None:
    frame = pipe.encode_frame(pipe.result_header(1234), b"out")
    head_len, _ = pipe.parse_prefix(frame)
    header, blob = pipe.decode_body(frame[pipe.PREFIX_SIZE :], head_len)
    assert header == {"op": pipe.RESULT, "ok": True, "rss_kb": 1234} and blob == b"out"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0, "exited normally (0: "),
        (pipe.EX_MEMORY << 8, "exited with EX_MEMORY (88: it ran out of memory_mb)"),
        (pipe.EX_PROTOCOL << 8, "exited with EX_PROTOCOL (89: a pipe message from the agent"),
        (pipe.EX_LOAD_FAILED << 8, "exited with EX_LOAD_FAILED (90: its handler could not"),
        (pipe.EX_ORPHANED << 8, "exited with EX_ORPHANED (91: the agent was gone"),
        (3 << 8, "exited with code 3 (not a worker exit code"),
        (signal.SIGSEGV, "died from SIGSEGV (11)"),
        (signal.SIGKILL, "died from SIGKILL (9), not sent by the pool"),
        (None, "vanished"),
    ],
)
def test_exit_reason_names_every_status(status: int | None, expected: str) -> None:
    assert pipe.exit_reason(status).startswith(expected), pipe.exit_reason(status)


def test_exit_reason_says_who_sent_the_sigkill() -> None:
    reason = pipe.exit_reason(signal.SIGKILL, "the pool at the deadline")
    assert reason == "was killed by SIGKILL (9) from the pool at the deadline"
    # a killer does not hide an exit code: the worker had exited by itself
    assert "EX_PROTOCOL" in pipe.exit_reason(pipe.EX_PROTOCOL << 8, "the pool")


# -- real workers, one exit code each ----------------------------------------------------------


@pytest.fixture
def worker() -> Iterator[Worker]:
    """A spawned, ready generic worker (no function yet); killed and reaped at the end."""
    with leak_check():
        spawned = pool_process.spawn(python=sys.executable, codec="json", user=None, cwd=None)
        try:
            header, _ = spawned.recv(time.monotonic() + DEADLINE_S)
            assert header == {"op": pipe.READY, "pid": spawned.pid}
            yield spawned
        finally:
            spawned.kill()


def _await_death(worker: Worker) -> None:
    """Read until the worker closes its pipe (it exits), then reap it."""
    with pytest.raises(pipe.FrameError) as info:
        worker.recv(time.monotonic() + DEADLINE_S)
    assert info.value.eof
    assert worker.wait_exit(DEADLINE_S)
    worker.kill()


def _load_message(**overrides: object) -> pipe.LoadMsg:
    message = pipe.load(
        function_id="f",
        codec="pickle",
        kind="pickle",
        path="",
        entrypoint="",
        environment={},
        memory_bytes=0,
        rlimits={"nofile": 1024, "fsize": 1 << 28, "nproc": 0},
        sys_path=[],
        uid=None,
        gid=None,
        max_result=0,
        max_result_source="",
    )
    message.update(overrides)  # type: ignore[typeddict-item]
    return message


def test_exit_op_is_a_normal_exit(worker: Worker) -> None:
    worker.send({"op": pipe.EXIT})
    _await_death(worker)
    assert worker.exit_reason.startswith("exited normally (0")


def test_closed_pipe_is_a_normal_exit(worker: Worker) -> None:
    os.close(worker.wfd)
    worker.wfd = os.open(os.devnull, os.O_WRONLY)  # kill() closes it again
    _await_death(worker)
    assert worker.exit_reason.startswith("exited normally (0")


@pytest.mark.parametrize(
    "frame",
    [
        pipe.encode_frame(b"\xff not json"),  # a corrupted header
        pipe.encode_frame({"op": "dance"}),  # an op it does not know
        pipe.encode_frame(pipe.invoke_header("r-1"), b""),  # an invoke before any load
    ],
    ids=["corrupted-frame", "unknown-op", "invoke-before-load"],
)
def test_unreadable_message_is_ex_protocol(worker: Worker, frame: bytes) -> None:
    pipe.write_all(worker.wfd, frame)
    _await_death(worker)
    error = worker.death_error("f")
    assert isinstance(error, WorkerCrashed) and error.exit_code == pipe.EX_PROTOCOL
    reason = "exited with EX_PROTOCOL (89: a pipe message from the agent it could not parse)"
    assert str(error) == f"worker of f {reason}"


def test_handler_that_cannot_load_is_ex_load_failed(worker: Worker) -> None:
    worker.send(_load_message(kind="package", path="/nonexistent", entrypoint="nope:handler"))
    reply, _ = worker.recv(time.monotonic() + DEADLINE_S)
    assert reply["op"] == pipe.LOAD_FAILED and reply["error"]["type"] == "handler_error"
    _await_death(worker)
    assert worker.exit_reason.startswith("exited with EX_LOAD_FAILED (90")


def test_memory_error_is_ex_memory(worker: Worker) -> None:
    def hog() -> None:  # nested: cloudpickle ships it by value
        raise MemoryError

    worker.send(_load_message(), cloudpickle.dumps(hog))
    reply, _ = worker.recv(time.monotonic() + DEADLINE_S)
    assert reply["op"] == pipe.LOADED
    worker.send(pipe.invoke_header("r-1"), cloudpickle.dumps(((), {})))
    reply, _ = worker.recv(time.monotonic() + DEADLINE_S)
    assert reply["op"] == pipe.RESULT and reply["error"]["type"] == "memory_exceeded"
    _await_death(worker)
    assert worker.exit_reason.startswith("exited with EX_MEMORY (88")
    assert isinstance(worker.death_error("f"), MemoryLimitExceeded)


def test_worker_whose_agent_is_gone_is_ex_orphaned() -> None:
    """A worker told that its parent is another process exits EX_ORPHANED at once."""
    with leak_check():
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-c",
                pool_process._BOOTSTRAP,
                pool_process._AGENT_ROOT,
                str(child_r),
                str(child_w),
                "json",
                str(os.getppid()),  # not its parent: as if the agent had died before
            ],
            stdin=subprocess.DEVNULL,
            pass_fds=(child_r, child_w),
            start_new_session=True,
            env=dict(pool_process.BASE_ENV),
        )
        os.close(child_r)
        os.close(child_w)
        orphan = Worker(proc, parent_r, parent_w)
        try:
            _await_death(orphan)
        finally:
            orphan.kill()
        error = orphan.death_error("f")
        assert isinstance(error, WorkerCrashed) and error.exit_code == pipe.EX_ORPHANED
        assert "exited with EX_ORPHANED (91: the agent was gone" in str(error)


# -- through the pool: the reason reaches the caller or the log --------------------------------


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[WorkerPool]:
    (tmp_path / "exits.py").write_text(HANDLERS)
    (tmp_path / "broken.py").write_text("raise ImportError('not today')\n")
    with leak_check():
        pool = WorkerPool(max_workers=4, prestart=0, codec="json")
        pool.start()
        try:
            yield pool
        finally:
            pool.close()


def _config(path: Path, entrypoint: str, timeout_s: float = 10) -> FunctionConfig:
    return FunctionConfig(
        function_id="f",
        memory_mb=64,
        timeout_s=timeout_s,
        kind="package",
        path=str(path),
        entrypoint=entrypoint,
    )


def test_pool_reports_a_handler_exit_code(pool: WorkerPool, tmp_path: Path) -> None:
    pool.register(_config(tmp_path, "exits:exit_with"))
    with pytest.raises(WorkerCrashed) as info:
        pool.invoke("f", (3,))
    assert info.value.exit_code == 3 and info.value.type == "worker_crashed"
    assert str(info.value).startswith("worker of f exited with code 3 (not a worker exit code")


def test_pool_reports_ex_protocol(
    pool: WorkerPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame the worker cannot parse (here: a corrupted invoke header) kills it with
    EX_PROTOCOL, and the caller is told so."""
    pool.register(_config(tmp_path, "exits:echo"))
    assert pool.invoke("f", (1,)).value == 1
    monkeypatch.setattr(
        pipe, "invoke_header", lambda request_id, request_json=False: b"\xff corrupted"
    )
    with pytest.raises(WorkerCrashed) as info:
        pool.invoke("f", (2,))
    assert info.value.exit_code == pipe.EX_PROTOCOL and info.value.type == "worker_crashed"
    assert "exited with EX_PROTOCOL (89: a pipe message from the agent" in str(info.value)
    monkeypatch.undo()
    assert pool.invoke("f", (3,)).value == 3


def test_pool_logs_ex_load_failed(
    pool: WorkerPool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that cannot load is still handler_error for the caller; the log line says
    the worker then exited EX_LOAD_FAILED, as it should (read, not SIGKILLed first)."""
    caplog.set_level(logging.WARNING, logger="agent.exec.pool.loading")
    with pytest.raises(HandlerError, match="not today") as info:
        pool.check_load(_config(tmp_path, "broken:handler"))
    assert info.value.type == "handler_error"
    [line] = [r.getMessage() for r in caplog.records if "failed to load" in r.getMessage()]
    assert "its worker exited with EX_LOAD_FAILED (90: its handler could not be loaded)" in line


def test_pool_names_its_own_sigkill_at_the_deadline(
    pool: WorkerPool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.exec.pool.process")
    pool.register(_config(tmp_path, "exits:sleep", timeout_s=0.5))
    pid = pool.invoke("f", (0,)).worker_pid
    with pytest.raises(FunctionTimeout):
        pool.invoke("f", (30,))
    expected = f"worker {pid} of f was killed by SIGKILL (9) from the pool at the deadline"
    assert expected in [r.getMessage() for r in caplog.records]


def test_pool_reports_a_sigkill_it_did_not_send(pool: WorkerPool, tmp_path: Path) -> None:
    pool.register(_config(tmp_path, "exits:sleep"))
    pid = pool.invoke("f", (0,)).worker_pid
    pending = in_thread(lambda: pool.invoke("f", (30,)))
    time.sleep(0.3)  # let it start the sleep
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashed) as info:
        pending.result(timeout=DEADLINE_S)
    assert info.value.signal == signal.SIGKILL
    assert "died from SIGKILL (9), not sent by the pool" in str(info.value)


def test_pool_names_the_memory_sampler_as_the_killer(
    pool: WorkerPool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The sampler's kill (its code path, called directly) is memory_exceeded for the
    caller, and the reaped worker's reason names the sampler."""
    caplog.set_level(logging.DEBUG, logger="agent.exec.pool.process")
    pool.register(_config(tmp_path, "exits:sleep"))
    pid = pool.invoke("f", (0,)).worker_pid
    pending = in_thread(lambda: pool.invoke("f", (30,)))
    time.sleep(0.3)
    pool._tree_over_budget(Watched("f", os.getuid(), 64 * 1024), pid, 70 * 1024, 70 * 1024)
    with pytest.raises(MemoryLimitExceeded):
        pending.result(timeout=DEADLINE_S)
    wait_for(lambda: pid not in pool.worker_pids(), 5.0, "the worker was not reaped")
    expected = f"worker {pid} of f was killed by SIGKILL (9) from the memory sampler"
    assert expected in [r.getMessage() for r in caplog.records]
