"""Everything systemd: sd_notify messages, the watchdog interval, and where logs go.

Owns: the notify protocol (READY/STATUS/WATCHDOG/STOPPING/RELOADING datagrams to
``$NOTIFY_SOCKET``), reading ``$WATCHDOG_USEC``/``$WATCHDOG_PID``, and the root logger's
one handler (journald with structured fields when stderr really is the journal, plain
text on stderr otherwise).

Must never: raise or print because systemd is absent or a notify send failed (it is
silent outside systemd and logs a failed send once at debug level); touch the process
in a constructor (no sockets, no environment changes); unset or rewrite environment
variables; choose journald unless ``$JOURNAL_STREAM`` names the very file stderr is
(``journal.send`` drops messages silently when journald is absent).

systemd-python is optional: without it notify uses a small AF_UNIX datagram sender
and logging stays plain text.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, Final, TextIO

try:  # The C extension is a Linux-only, optional dependency.
    from systemd import daemon as _sd_daemon
except ImportError:  # pragma: no cover - depends on the installation
    _sd_daemon = None

try:
    from systemd import journal as _sd_journal
except ImportError:  # pragma: no cover - depends on the installation
    _sd_journal = None

__all__ = [
    "JOURNAL_FIELDS",
    "JournalFieldsFilter",
    "Notifier",
    "PlainFormatter",
    "journal_stream_matches",
    "set_level",
    "setup_logging",
]

_log = logging.getLogger(__name__)

# Known ``extra=`` keys rendered as structured fields. In the journal they appear
# upper-cased (function_id -> FUNCTION_ID): journald only accepts field names made of
# A-Z, 0-9 and "_", and systemd-python's JournalHandler forwards every record
# attribute under its own name, so a lower-case key would be dropped by journald.
JOURNAL_FIELDS: Final[tuple[str, ...]] = ("function_id", "request_id", "node_id", "topic")

SYSLOG_IDENTIFIER: Final = "edge-agent"

_LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class Notifier:
    """Sends sd_notify(3) messages; every method is a no-op without ``$NOTIFY_SOCKET``.

    Uses ``systemd.daemon.notify`` when systemd-python is importable and the process
    environment carries the same ``NOTIFY_SOCKET`` (libsystemd reads it with getenv),
    else a stdlib AF_UNIX datagram sender. Safe to call from any thread.
    """

    def __init__(
        self,
        notify_socket: str | None,
        *,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
        use_libsystemd: bool = True,
    ) -> None:
        # Only strings are stored: building a Notifier opens nothing.
        self._socket_address = notify_socket or None
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._use_libsystemd = use_libsystemd
        self._lock = threading.Lock()
        self._send_failed_logged = False

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] = os.environ, *, use_libsystemd: bool = True
    ) -> Notifier:
        """Build from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` in ``environ``."""
        return cls(
            environ.get("NOTIFY_SOCKET"),
            watchdog_usec=environ.get("WATCHDOG_USEC"),
            watchdog_pid=environ.get("WATCHDOG_PID"),
            use_libsystemd=use_libsystemd,
        )

    @property
    def enabled(self) -> bool:
        """True when ``NOTIFY_SOCKET`` was set, i.e. systemd listens for notifications."""
        return self._socket_address is not None

    @property
    def backend(self) -> str:
        """Which sender a message would go through: "libsystemd", "socket" or "disabled"."""
        if self._socket_address is None:
            return "disabled"
        if (
            self._use_libsystemd
            and _sd_daemon is not None
            # libsystemd ignores our mapping and reads the process environment.
            and os.environ.get("NOTIFY_SOCKET") == self._socket_address
        ):
            return "libsystemd"
        return "socket"

    def ready(self) -> None:
        """Start-up (or a reload) is complete."""
        self._send("READY=1")

    def status(self, text: str) -> None:
        """One line of free-form status shown by ``systemctl status``."""
        # A newline would start a new (bogus) assignment in the datagram.
        self._send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        """Keep-alive ping; call every ``watchdog_interval()`` seconds."""
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        """Shutdown has begun (draining)."""
        self._send("STOPPING=1")

    def reloading(self) -> None:
        """A reload has begun; send ``ready()`` when it is done.

        MONOTONIC_USEC is required by Type=notify-reload (systemd 253+) to match the
        message to the reload request; older systemd ignores it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of WATCHDOG_USEC), or None if not asked."""
        usec = _parse_positive_int(self._watchdog_usec)
        if usec is None:
            return None
        if (
            self._watchdog_pid is not None
            and _parse_positive_int(self._watchdog_pid) != os.getpid()
        ):
            return None  # The watchdog is meant for another process (e.g. our parent).
        return usec / 2 / 1_000_000

    def _send(self, message: str) -> None:
        backend = self.backend
        if backend == "disabled":
            return
        try:
            if backend == "libsystemd":
                # Raises OSError on failure; returns False only if the variable is unset.
                _sd_daemon.notify(message)
            else:
                _send_datagram(self._socket_address or "", message.encode())
        except (OSError, ValueError) as exc:
            with self._lock:
                if self._send_failed_logged:
                    return
                self._send_failed_logged = True
            _log.debug(
                "sd_notify to %s failed (%s); further failures are not logged",
                self._socket_address,
                exc,
            )


def _send_datagram(address: str, payload: bytes) -> None:
    """Send one datagram to an AF_UNIX socket path, or an abstract one ("@name")."""
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        # Same rule as sd_notify: only absolute paths and abstract names.
        raise ValueError(f"unsupported NOTIFY_SOCKET address {address!r}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(payload, address)


def _parse_positive_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text.strip(), 10)
    except ValueError:
        return None
    return value if value > 0 else None


# ---------------------------------------------------------------------------- logging


def journal_stream_matches(environ: Mapping[str, str], fd: int) -> bool:
    """True if ``JOURNAL_STREAM`` ("dev:inode") names the file open on ``fd``."""
    dev_ino = environ.get("JOURNAL_STREAM", "").split(":")
    if len(dev_ino) != 2:
        return False
    try:
        dev, ino = int(dev_ino[0]), int(dev_ino[1])
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _known_fields(record: logging.LogRecord) -> list[tuple[str, object]]:
    return [
        (name, value)
        for name in JOURNAL_FIELDS
        if (value := getattr(record, name, None)) is not None
    ]


class JournalFieldsFilter(logging.Filter):
    """Copies known ``extra=`` keys (JOURNAL_FIELDS) to upper-case attributes.

    systemd-python's JournalHandler sends every record attribute as a journal field of
    the same name, so ``record.FUNCTION_ID`` becomes the field FUNCTION_ID.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _known_fields(record):
            setattr(record, name.upper(), str(value))
        return True


class PlainFormatter(logging.Formatter):
    """``2026-11-27T04:42:12.123Z INFO agent.edge.loop: message [function_id=f1]``."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # Wall clock in UTC: this is a timestamp for humans, not an interval.
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"
        fields = _known_fields(record)
        if fields:
            line += " [" + " ".join(f"{k}={_render_value(v)}" for k, v in fields) + "]"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _render_value(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=[]' for c in text):
        return json.dumps(text, ensure_ascii=False)  # Quoted, so the line stays parseable.
    return text


_installed_handler: logging.Handler | None = None


def setup_logging(
    level: str,
    *,
    journald: bool | None = None,
    environ: Mapping[str, str] = os.environ,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Install the one agent handler on the root logger and set its level.

    ``journald=None`` picks journald only when ``JOURNAL_STREAM`` matches ``stream``
    (default: sys.stderr) and systemd-python is importable; True/False force the
    choice (True still falls back to plain text without systemd-python). Calling it
    again replaces the handler it installed before; other handlers are left alone.
    Returns the installed handler.
    """
    global _installed_handler
    numeric = _parse_level(level)
    out = sys.stderr if stream is None else stream
    if journald is None:
        journald = _stream_is_journal(environ, out)
    handler: logging.Handler
    if journald and _sd_journal is not None:
        handler = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
        handler.addFilter(JournalFieldsFilter())
    else:
        handler = logging.StreamHandler(out)
        handler.setFormatter(PlainFormatter())
    root = logging.getLogger()
    if _installed_handler is not None:
        root.removeHandler(_installed_handler)
        _installed_handler.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    _installed_handler = handler
    return handler


def set_level(level: str) -> None:
    """Change the root log level (SIGHUP reload); raises ValueError for unknown names."""
    logging.getLogger().setLevel(_parse_level(level))


def _parse_level(level: str) -> int:
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of {', '.join(_LEVELS)}"
        ) from None


def _stream_is_journal(environ: Mapping[str, str], stream: Any) -> bool:
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False  # io.StringIO and friends have no fd.
    return isinstance(fd, int) and journal_stream_matches(environ, fd)
