"""``edge-agent run`` as a real subprocess: its config, start, signals, stop, kill, logs.

Owns the one way tests, benchmarks and the demo run an agent process: a TOML config written
from sections (the tests' defaults, or a base of the caller's), ``python -m agent run``
started from the repository with its output in a log file, and a stop that never leaks (after
the grace period SIGKILL, its workers too, as systemd's cgroup kill would). Waits report
through :mod:`testing.outcomes`.

It must never start a broker (:mod:`testing.broker` does) nor read the agent's state behind
its back beyond what a caller asks for.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sqlite3
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from testing.outcomes import fail
from testing.wait import wait_for

#: The repository: agents run with it as their working directory.
REPO = Path(__file__).resolve().parent.parent


def default_config(node_id: str, port: int, state_dir: Path) -> dict[str, Any]:
    """The tests' agent: fast reconnects and heartbeats, debug logs, a small warm pool."""
    return {
        "node": {"id": node_id, "capabilities": ["python"]},
        "mqtt": {
            "host": "127.0.0.1",
            "port": port,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
            "keepalive": 5,
        },
        "agent": {
            "state_dir": str(state_dir),
            "heartbeat_interval_s": 1.0,
            "log_level": "debug",
            "shutdown_grace_s": 5.0,
        },
        "runtime": {"prestart": 1, "max_workers": 4},
    }


class AgentProcess:
    """``python -m agent run`` as a real subprocess with its own config and state dir.

    The config is :func:`default_config` unless ``base`` is given (then ``base`` as it is: the
    caller names the node, broker and state dir); each keyword section is merged into it.
    """

    def __init__(
        self,
        workdir: Path,
        port: int,
        node_id: str = "gw-test",
        *,
        base: Mapping[str, Any] | None = None,
        **sections: Any,
    ) -> None:
        self.workdir = workdir
        self.node_id = node_id
        self.state_dir = workdir / f"state-{node_id}"
        self.config_path = workdir / f"{node_id}.toml"
        config: dict[str, Any] = (
            default_config(node_id, port, self.state_dir)
            if base is None
            else copy.deepcopy(dict(base))
        )
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        if base is not None and "state_dir" in config.get("agent", {}):
            self.state_dir = Path(config["agent"]["state_dir"])
        self.config_path.write_text(tomli_w.dumps(config))
        self.log_path = workdir / f"agent-{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: The exit code seen by the last :meth:`stop` (None: killed or never started).
        self.returncode: int | None = None

    def start(
        self, env: dict[str, str] | None = None, *, argv: Sequence[str] | None = None
    ) -> AgentProcess:
        """Start it (``argv``: another command line that runs the agent on this config)."""
        command = argv or [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, **(env or {})},
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the agent was not started"
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        wait_for(
            lambda: text in self.log(),
            timeout,
            f"agent log never said {text!r}:\n{self.log_tail()}",
        )

    def accepted_on_record(self) -> list[str]:
        """Request ids in its state.db's ``accepted_invokes`` (read-only; [] before any)."""
        db = self.state_dir / "state.db"
        if not db.exists():
            return []
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
            if "accepted_invokes" not in tables:
                return []
            return [rid for (rid,) in conn.execute("SELECT request_id FROM accepted_invokes")]
        finally:
            conn.close()

    def signal(self, sig: int) -> None:
        assert self.proc is not None, "the agent was not started"
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None, "the agent was not started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            fail(f"agent did not exit within {timeout}s:\n{self.log_tail()}")

    def kill9(self) -> None:
        """SIGKILL the agent; its workers too (own sessions), as systemd's cgroup kill would."""
        assert self.proc is not None, "the agent was not started"
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        self.proc.kill()
        self.proc.wait(10)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
                child.wait(5)

    def stop(self) -> int | None:
        """SIGTERM and wait (it drains and exits); after 20 s SIGKILL it and its workers.
        Returns the exit code (also in :attr:`returncode`)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self.proc is not None:
            self.returncode = self.proc.returncode
        self.proc = None
        return self.returncode
