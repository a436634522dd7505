"""agent.edge.systemd (notify, watchdog, logging) and the packaging/systemd files."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.edge import systemd as sd
from agent.edge.systemd import Notifier, PlainFormatter, set_level, setup_logging

try:
    from systemd import journal as sd_journal
except ImportError:  # pragma: no cover - depends on the installation
    sd_journal = None

PACKAGING = Path(__file__).resolve().parent.parent / "packaging" / "systemd"
UNIT = PACKAGING / "edge-agent.service"
RECV_TIMEOUT_S = 2.0


# ---------------------------------------------------------------------------- notify


class NotifyListener:
    """A bound AF_UNIX datagram socket playing systemd's notify socket."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # As it goes into NOTIFY_SOCKET.

    def recv(self, what: str) -> bytes:
        self.sock.settimeout(RECV_TIMEOUT_S)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"no {what} datagram within {RECV_TIMEOUT_S:g} s on {self.address}")

    def assert_silent(self) -> None:
        self.sock.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            data = self.sock.recv(65536)
            pytest.fail(f"unexpected datagram {data!r}")


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifyListener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        assert len(path) < 108, f"socket path too long for AF_UNIX: {path}"
        sock.bind(path)
        address = path
    else:
        name = f"edge-agent-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    with sock:
        yield NotifyListener(sock, address)


def libsystemd_notifier(address: str, monkeypatch: pytest.MonkeyPatch) -> Notifier:
    pytest.importorskip("systemd.daemon", reason="systemd-python is not installed")
    # libsystemd reads NOTIFY_SOCKET from the process environment, not from a mapping.
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier.from_env(os.environ)
    assert notifier.backend == "libsystemd"
    return notifier


def stdlib_notifier(address: str, monkeypatch: pytest.MonkeyPatch) -> Notifier:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address}, use_libsystemd=False)
    assert notifier.backend == "socket"
    return notifier


NotifierFactory = Callable[[str, pytest.MonkeyPatch], Notifier]


@pytest.fixture(params=[libsystemd_notifier, stdlib_notifier], ids=["libsystemd", "stdlib"])
def make_notifier(request: pytest.FixtureRequest) -> NotifierFactory:
    factory: NotifierFactory = request.param
    return factory


def test_notifier_sends_exact_datagrams(
    listener: NotifyListener, make_notifier: NotifierFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    notifier = make_notifier(listener.address, monkeypatch)
    assert notifier.enabled

    notifier.ready()
    assert listener.recv("READY=1") == b"READY=1"
    notifier.status("connected to broker; 3 functions active")
    assert listener.recv("STATUS=") == b"STATUS=connected to broker; 3 functions active"
    notifier.watchdog()
    assert listener.recv("WATCHDOG=1") == b"WATCHDOG=1"
    notifier.stopping()
    assert listener.recv("STOPPING=1") == b"STOPPING=1"

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading = listener.recv("RELOADING=1")
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", reloading)
    assert match, f"unexpected reload datagram {reloading!r}"
    assert before <= int(match[1]) <= after
    listener.assert_silent()


def test_status_newlines_do_not_leak_into_other_assignments(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multi-line STATUS text must not inject e.g. a READY=1 line into the datagram."""
    notifier = stdlib_notifier(listener.address, monkeypatch)
    notifier.status("degraded\nREADY=1")
    assert listener.recv("STATUS=") == b"STATUS=degraded READY=1"


def test_mapping_other_than_process_env_uses_stdlib_sender(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libsystemd would read the process env, so a differing mapping must not use it."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": listener.address})
    assert notifier.backend == "socket"
    notifier.ready()
    assert listener.recv("READY=1") == b"READY=1"


def test_constructor_opens_nothing() -> None:
    fds_before = sorted(os.listdir("/proc/self/fd"))
    Notifier.from_env({"NOTIFY_SOCKET": "/nonexistent/notify.sock", "WATCHDOG_USEC": "x"})
    assert sorted(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.parametrize("use_libsystemd", [True, False], ids=["libsystemd", "stdlib"])
def test_without_notify_socket_every_method_is_a_silent_noop(
    use_libsystemd: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    caplog.set_level(logging.DEBUG, logger="agent.edge.systemd")
    for notifier in (
        Notifier.from_env(use_libsystemd=use_libsystemd),
        Notifier.from_env({}, use_libsystemd=use_libsystemd),
        Notifier.from_env({"NOTIFY_SOCKET": ""}, use_libsystemd=use_libsystemd),
    ):
        assert not notifier.enabled
        assert notifier.backend == "disabled"
        notifier.ready()
        notifier.status("x")
        notifier.watchdog()
        notifier.stopping()
        notifier.reloading()
    assert caplog.records == []


@pytest.mark.parametrize("use_libsystemd", [True, False], ids=["libsystemd", "stdlib"])
@pytest.mark.parametrize("address", ["/nonexistent/notify.sock", "relative.sock"])
def test_send_failure_is_logged_once_at_debug_and_never_raises(
    use_libsystemd: bool,
    address: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A vanished notify socket must not crash the agent or flood the log every ping."""
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    caplog.set_level(logging.DEBUG, logger="agent.edge.systemd")
    notifier = Notifier.from_env(use_libsystemd=use_libsystemd)
    for _ in range(3):
        notifier.ready()
        notifier.watchdog()
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert address in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "garbage"}, None),
        ({"WATCHDOG_USEC": "garbage"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-2000000"}, None),
        ({"WATCHDOG_USEC": "2.5"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert Notifier.from_env(environ).watchdog_interval() == expected


# ---------------------------------------------------------------------------- logging


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture
def stderr_file(tmp_path: Path) -> Iterator[io.TextIOWrapper]:
    """A real file standing in for stderr, so it has a dev:inode to match."""
    with open(tmp_path / "stderr", "w", encoding="utf-8") as stream:
        yield stream


def journal_stream_of(stream: io.TextIOWrapper) -> str:
    st = os.fstat(stream.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def is_journal_handler(handler: logging.Handler) -> bool:
    return sd_journal is not None and isinstance(handler, sd_journal.JournalHandler)


def test_setup_logging_is_plain_text_without_journal_stream(
    stderr_file: io.TextIOWrapper,
) -> None:
    handler = setup_logging("info", environ={}, stream=stderr_file)
    assert isinstance(handler, logging.StreamHandler)
    assert isinstance(handler.formatter, PlainFormatter)
    assert handler in logging.getLogger().handlers


@pytest.mark.parametrize(
    "journal_stream",
    [
        lambda st: f"{st.st_dev}:{st.st_ino + 1}",
        lambda st: f"{st.st_dev + 1}:{st.st_ino}",
        lambda st: "garbage",
        lambda st: f"{st.st_dev}:{st.st_ino}:0",
    ],
    ids=["other-inode", "other-dev", "garbage", "three-parts"],
)
def test_setup_logging_is_plain_text_when_journal_stream_does_not_match(
    journal_stream: Callable[[os.stat_result], str], stderr_file: io.TextIOWrapper
) -> None:
    """stderr redirected away from journald (e.g. to a file) must keep the logs there."""
    environ = {"JOURNAL_STREAM": journal_stream(os.fstat(stderr_file.fileno()))}
    handler = setup_logging("info", environ=environ, stream=stderr_file)
    assert not is_journal_handler(handler)
    assert isinstance(handler.formatter, PlainFormatter)


def test_setup_logging_is_plain_text_for_a_stream_without_fd() -> None:
    handler = setup_logging("info", environ={"JOURNAL_STREAM": "1:1"}, stream=io.StringIO())
    assert isinstance(handler.formatter, PlainFormatter)


needs_journal = pytest.mark.skipif(sd_journal is None, reason="systemd-python is not installed")


@needs_journal
def test_setup_logging_picks_journald_when_journal_stream_matches(
    stderr_file: io.TextIOWrapper, capsys: pytest.CaptureFixture[str]
) -> None:
    environ = {"JOURNAL_STREAM": journal_stream_of(stderr_file)}
    handler = setup_logging("info", environ=environ, stream=stderr_file)
    assert is_journal_handler(handler)
    # No journald on this machine: journal.send drops the message silently.
    logging.getLogger("agent.edge.loop").info("hello journal")
    assert capsys.readouterr().err == ""


@needs_journal
def test_journald_gets_known_extra_keys_as_upper_case_fields(
    stderr_file: io.TextIOWrapper,
) -> None:
    """journald drops lower-case field names, so extra= keys must be upper-cased."""
    sent: list[tuple[str, dict[str, Any]]] = []
    handler = setup_logging(
        "debug", environ={"JOURNAL_STREAM": journal_stream_of(stderr_file)}, stream=stderr_file
    )

    def capture(message: str, /, **fields: Any) -> None:  # journal.send's shape
        sent.append((message, fields))

    handler.send = capture  # type: ignore[attr-defined]

    logging.getLogger("agent.edge.loop").info(
        "invoked %s",
        "f1",
        extra={"function_id": "f1", "request_id": "r1", "node_id": "gw-1", "topic": "edge/x"},
    )

    assert len(sent) == 1, f"expected one journal entry, got {sent!r}"
    message, fields = sent[0]
    assert message == "invoked f1"
    assert fields["FUNCTION_ID"] == "f1"
    assert fields["REQUEST_ID"] == "r1"
    assert fields["NODE_ID"] == "gw-1"
    assert fields["TOPIC"] == "edge/x"
    assert fields["SYSLOG_IDENTIFIER"] == "edge-agent"
    assert fields["PRIORITY"] == "6"
    assert fields["LOGGER"] == "agent.edge.loop"


def test_forced_choice_overrides_detection(stderr_file: io.TextIOWrapper) -> None:
    environ = {"JOURNAL_STREAM": journal_stream_of(stderr_file)}
    handler = setup_logging("info", journald=False, environ=environ, stream=stderr_file)
    assert isinstance(handler.formatter, PlainFormatter)
    if sd_journal is not None:
        forced = setup_logging("info", journald=True, environ={}, stream=io.StringIO())
        assert is_journal_handler(forced)


def test_plain_text_line_format_and_extra_fields() -> None:
    stream = io.StringIO()
    setup_logging("debug", environ={}, stream=stream)
    logging.getLogger("agent.edge.loop").info(
        "invocation done in %d ms",
        12,
        extra={"request_id": "r1", "function_id": "f1", "unrelated": "not shown"},
    )
    logging.getLogger("agent.mqtt").debug("no fields here")
    logging.getLogger("agent.mqtt").warning("odd", extra={"topic": "a b=c", "node_id": None})
    lines = stream.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(
        stamp
        + r" INFO agent\.edge\.loop: invocation done in 12 ms \[function_id=f1 request_id=r1\]",
        lines[0],
    ), lines[0]
    assert re.fullmatch(stamp + r" DEBUG agent\.mqtt: no fields here", lines[1]), lines[1]
    assert re.fullmatch(stamp + r' WARNING agent\.mqtt: odd \[topic="a b=c"\]', lines[2]), lines[2]
    assert len(lines) == 3


def test_plain_timestamp_is_utc_with_milliseconds() -> None:
    record = logging.makeLogRecord({"name": "agent.edge.loop", "levelname": "INFO", "msg": "m"})
    record.created, record.msecs = 1795754532.1234, 123.4
    assert PlainFormatter().format(record) == "2026-11-27T04:42:12.123Z INFO agent.edge.loop: m"


def test_plain_text_includes_traceback() -> None:
    stream = io.StringIO()
    setup_logging("info", environ={}, stream=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("agent.edge.loop").exception("failed", extra={"function_id": "f1"})
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("ERROR agent.edge.loop: failed [function_id=f1]")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: boom"


def test_setup_logging_twice_replaces_its_own_handler_only() -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    first = setup_logging("info", environ={}, stream=io.StringIO())
    second = setup_logging("info", environ={}, stream=io.StringIO())
    assert first not in root.handlers
    assert second in root.handlers
    assert foreign in root.handlers


def test_set_level_for_sighup_reload() -> None:
    setup_logging("info", environ={}, stream=io.StringIO())
    set_level("DEBUG")
    assert logging.getLogger().level == logging.DEBUG
    set_level("warning")
    assert logging.getLogger().level == logging.WARNING
    with pytest.raises(ValueError, match="unknown log level 'verbose'"):
        set_level("verbose")
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("loud", environ={}, stream=io.StringIO())


def test_journal_stream_matches_real_fd(stderr_file: io.TextIOWrapper) -> None:
    fd = stderr_file.fileno()
    assert sd.journal_stream_matches({"JOURNAL_STREAM": journal_stream_of(stderr_file)}, fd)
    assert not sd.journal_stream_matches({}, fd)
    assert not sd.journal_stream_matches({"JOURNAL_STREAM": "1:2"}, 10_000)  # closed fd


# ---------------------------------------------------------------------------- packaging


def run_systemd_analyze_verify(unit: Path) -> subprocess.CompletedProcess[str]:
    systemd_analyze = shutil.which("systemd-analyze")
    if systemd_analyze is None:
        pytest.skip("systemd-analyze is not installed")
    env = {
        **os.environ,
        # warning keeps info/debug chatter out but every syntax warning in.
        "SYSTEMD_LOG_LEVEL": "warning",
        # Print to stderr even if pytest runs under systemd, where the default target
        # would send the findings to the journal and leave stderr empty.
        "SYSTEMD_LOG_TARGET": "console",
        "SYSTEMD_LOG_COLOR": "0",
    }
    return subprocess.run(
        [systemd_analyze, "verify", "--recursive-errors=no", str(unit)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify prints nothing for the shipped unit (any output fails).

    verify exits 0 even on unknown keys and unparsable values, so the test fails on any
    stdout/stderr. verify rejects an ExecStart binary that does not exist, so when
    /opt/edge-agent/bin/edge-agent (the .deb's) is not installed the unit is copied to
    tmp_path with only that path replaced by /bin/true; every other line is checked as
    shipped.
    SYSTEMD_LOG_LEVEL=warning, SYSTEMD_LOG_TARGET=console (so findings reach stderr even
    under systemd), SYSTEMD_LOG_COLOR=0, --recursive-errors=no (do not report problems
    in the system's own units that ours merely references).
    """
    text = UNIT.read_text(encoding="utf-8")
    exec_start = "ExecStart=/opt/edge-agent/bin/edge-agent "
    assert text.count(exec_start) == 1, "ExecStart moved; update this test and the README"
    if not os.access("/opt/edge-agent/bin/edge-agent", os.X_OK):
        text = text.replace(exec_start, "ExecStart=/bin/true ")
    unit = tmp_path / UNIT.name
    unit.write_text(text, encoding="utf-8")

    result = run_systemd_analyze_verify(unit)

    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), (
        f"systemd-analyze verify complained:\n{result.stdout}{result.stderr}"
    )


def test_verify_harness_reports_syntax_errors(tmp_path: Path) -> None:
    """Guards the test above: its settings must not silence verify's warnings."""
    unit = tmp_path / "broken.service"
    unit.write_text("[Service]\nExecStart=/bin/true\nWatchdogSek=30\n", encoding="utf-8")
    result = run_systemd_analyze_verify(unit)
    assert "Unknown key" in result.stderr, f"no warning for a typo: {result!r}"


def test_unit_keeps_the_contract_with_the_agent() -> None:
    """Settings the agent's code relies on (notify, watchdog, exit 78, drain on SIGTERM)."""
    settings = {
        key: value
        for line in UNIT.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith(("#", "["))
        for key, _, value in [line.partition("=")]
    }
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["WatchdogSec"] == "30"
    assert settings["RestartPreventExitStatus"] == "78"
    assert settings["KillMode"] == "mixed"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["User"] == settings["Group"] == "edge-agent"
    # a uid per function needs these three and nothing else; workers drop them all
    caps = "CAP_SETUID CAP_SETGID CAP_KILL"
    assert settings["CapabilityBoundingSet"] == settings["AmbientCapabilities"] == caps
    assert settings["StateDirectoryMode"] == "0711"  # function users pass, never list
    assert "MemoryDenyWriteExecute" not in settings


def test_sysusers_snippet_creates_the_user_and_group(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    subprocess.run(
        [sysusers, f"--root={tmp_path}", str(PACKAGING / "edge-agent.sysusers")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwd = (tmp_path / "etc" / "passwd").read_text(encoding="utf-8")
    group = (tmp_path / "etc" / "group").read_text(encoding="utf-8")
    assert re.search(r"^edge-agent:x:\d+:\d+:[^:]*:/:/usr/sbin/nologin$", passwd, re.M), passwd
    assert re.search(r"^edge-agent:x:\d+:$", group, re.M), group


@pytest.mark.skipif(os.geteuid() != 0, reason="chown in systemd-tmpfiles needs root")
def test_tmpfiles_snippet_makes_config_dir_root_edge_agent_0750(tmp_path: Path) -> None:
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        pytest.skip("systemd-sysusers/systemd-tmpfiles are not installed")
    (tmp_path / "etc").mkdir()
    for command in (
        [sysusers, f"--root={tmp_path}", str(PACKAGING / "edge-agent.sysusers")],
        [tmpfiles, f"--root={tmp_path}", "--create", str(PACKAGING / "edge-agent.tmpfiles")],
    ):
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    gid = next(
        int(line.split(":")[2])
        for line in (tmp_path / "etc" / "group").read_text(encoding="utf-8").splitlines()
        if line.startswith("edge-agent:")
    )
    st = (tmp_path / "etc" / "edge-agent").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, gid, 0o750)
