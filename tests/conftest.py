"""Shared fixtures: real brokers on free ports, real agent processes, a test cloud.

The harness itself (brokers, agent processes, the cloud client, waits, ports) lives in
``testing/``, shared with scripts/; this file turns it into fixtures, makes its outcomes
pytest's (a missed deadline fails the test, a missing broker skips it), and keeps the
helpers only tests use (spec builders, the CLI runner, the cuttable uplink).

Nothing here sleeps to synchronise: every wait polls a condition with a deadline and fails
with a message that says what did not happen.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testing import outcomes
from testing.agent_process import REPO, AgentProcess
from testing.broker import Mosquitto, NatsCluster, NatsServer, RabbitMQ
from testing.cloud import Cloud
from testing.ports import free_port

outcomes.report_with(fail=pytest.fail, skip=pytest.skip)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker per test: retained messages and sessions never leak between tests."""
    mosq = Mosquitto(tmp_path).start()
    yield mosq
    mosq.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A fresh 3-node NATS cluster (JetStream, MQTT listener) per test; its ack wait is 10 s
    (NATS's default is 30 s) so a message lost with a killed node comes back sooner."""
    cluster = NatsCluster(tmp_path, ack_wait="10s").start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cloud(broker: Mosquitto) -> Iterator[Cloud]:
    c = Cloud(broker.port)
    yield c
    c.close()


@pytest.fixture
def agent_factory(tmp_path: Path, broker: Mosquitto) -> Iterator[Callable[..., AgentProcess]]:
    agents: list[AgentProcess] = []

    def make(node_id: str = "gw-test", port: int | None = None, **sections: Any) -> AgentProcess:
        agent = AgentProcess(tmp_path, port or broker.port, node_id, **sections)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.stop()


# -- helpers for the daemon, CLI and MQTT client tests --------------------------------------


def _edge_agent_command() -> list[str]:
    """The installed ``edge-agent`` console script, else ``python -m agent``."""
    script = Path(sys.executable).with_name("edge-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent"]


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``edge-agent ARGS`` as a real subprocess; the result, whatever the exit code."""
    return subprocess.run(
        [*_edge_agent_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def cli_status(agent: AgentProcess) -> dict[str, Any]:
    """``edge-agent status --json`` of an agent's config (works while it runs or not)."""
    done = run_cli("status", "--json", "--config", str(agent.config_path))
    assert done.returncode == 0, f"edge-agent status failed ({done.returncode}): {done.stderr}"
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def make_zip(members: dict[str, str | bytes]) -> bytes:
    """A zip of exactly these member names (even hostile ones such as ``../x.py``)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


# -- helpers for the state-sync tests -------------------------------------------------------


class TcpProxy:
    """A TCP relay from a port of its own to a broker: a gateway's uplink that a test can cut.

    :meth:`cut` resets every relayed connection and refuses new ones while the broker and the
    test's cloud clients stay up; :meth:`restore` accepts connections again. So an agent
    connected through the proxy really goes offline (and notices at once), its persistent
    session keeps collecting QoS 1 messages on the broker, and nothing else is disturbed.
    One thread runs every socket; :meth:`cut` and :meth:`restore` return once it obeyed.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._commands: list[tuple[str, threading.Event]] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._peers: dict[socket.socket, socket.socket] = {}
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._running = True
        #: A broker's manners: when set, a client connection whose bytes it returns True for
        #: is closed there (e.g. a CONNECT of a protocol version the "broker" refuses).
        self.close_if: Callable[[bytes], bool] | None = None
        self._clients: set[socket.socket] = set()
        self.closed_by_rule = 0

    def start(self) -> TcpProxy:
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._listen()
        self._thread.start()
        return self

    def cut(self) -> None:
        self._command("cut")

    def restore(self) -> None:
        self._command("restore")

    def close(self) -> None:
        if self._thread.is_alive():
            self._command("close")
            self._thread.join(5)
        self._wake_r.close()
        self._wake_w.close()

    def _command(self, name: str) -> None:
        done = threading.Event()
        with self._lock:
            self._commands.append((name, done))
        self._wake_w.send(b"x")
        if not done.wait(5):
            pytest.fail(f"the TCP proxy did not {name} within 5s")

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ)

    def _drop_all(self) -> None:
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        for sock in list(self._peers):
            self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._clients.discard(s)
            self._peers.pop(s, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(s)
            with contextlib.suppress(OSError):
                # RST rather than FIN: what a dead uplink looks like to both ends.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()

    def _run(self) -> None:
        while self._running:
            for key, _ in self._selector.select(1.0):
                sock = key.fileobj
                if sock is self._wake_r:
                    self._wake_r.recv(4096)
                    with self._lock:
                        commands, self._commands = self._commands, []
                    for name, done in commands:
                        if name in ("cut", "close"):
                            self._drop_all()
                        elif name == "restore" and self._listener is None:
                            self._listen()
                        if name == "close":
                            self._running = False
                        done.set()
                    break  # the selector's map may have changed
                if sock is self._listener:
                    client, _ = self._listener.accept()
                    try:
                        upstream = socket.create_connection(("127.0.0.1", self.target_port), 2)
                    except OSError:
                        client.close()
                        continue
                    for s in (client, upstream):
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        self._selector.register(s, selectors.EVENT_READ)
                    self._peers[client], self._peers[upstream] = upstream, client
                    self._clients.add(client)
                    continue
                assert isinstance(sock, socket.socket)
                if sock not in self._peers:
                    continue
                try:
                    data = sock.recv(65536)
                    if data and sock in self._clients and self.close_if and self.close_if(data):
                        self.closed_by_rule += 1
                        self._close(sock)
                        continue
                    if data:
                        self._peers[sock].sendall(data)
                        continue
                except OSError:
                    pass
                self._close(sock)
        self._selector.close()


@pytest.fixture
def uplink(broker: Mosquitto) -> Iterator[TcpProxy]:
    """A cuttable uplink to the test's broker (point an agent's ``mqtt.port`` at ``.port``)."""
    proxy = TcpProxy(broker.port).start()
    yield proxy
    proxy.close()


# -- functions under uids of their own (runtime.function_uids) --------------------------------

#: Debian's python3: function users can run it and read its standard library (this venv's
#: interpreter lives under /root, 0700, which no function user may enter).
WORKER_PYTHON = "/usr/bin/python3"
FUNCTION_UIDS = "61500-61599"
can_isolate = os.geteuid() == 0 and Path(WORKER_PYTHON).exists()
needs_isolation = pytest.mark.skipif(
    not can_isolate, reason="needs root (to switch users) and Debian's /usr/bin/python3"
)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A work directory other users may search (pytest's tmp_path sits under a 0700 one),
    as /var/lib is for the packaged agent."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="edge-isolation-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def isolated_agents(open_dir: Path, broker: Mosquitto) -> Iterator[Callable[..., AgentProcess]]:
    """Agents whose functions run under uids of their own; ``start(**runtime)``."""
    agents: list[AgentProcess] = []

    def start(**runtime: Any) -> AgentProcess:
        settings = {"function_uids": FUNCTION_UIDS, "worker_python": WORKER_PYTHON, **runtime}
        agent = AgentProcess(open_dir, broker.port, "gw-test", runtime=settings)
        agent.config_path.chmod(0o640)  # root-only, as /etc/edge-agent/agent.toml is
        agents.append(agent.start())
        return agent

    yield start
    for agent in agents:
        agent.stop()


# -- NATS with its MQTT listener (MQTT 3.1.1 only; maps topics to subjects) -----------------


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def mirror(broker: Mosquitto) -> Iterator[Any]:
    """A cloud mirror of node gw-test's synced state, on its own connection straight to the
    broker (never through a proxy)."""
    from agent.cloud.mirror import MirrorClient
    from agent.mqtt import MqttSettings

    client = MirrorClient(
        MqttSettings(port=broker.port, client_id=f"mirror-{uuid.uuid4().hex[:8]}"),
        nodes=["gw-test"],
    ).start()
    yield client
    client.stop()


# -- RabbitMQ with its MQTT plugin (3.10: no retained messages for wildcard subscriptions) ---


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    """One RabbitMQ node per test module (it takes 10-15 s to start); tests keep apart by
    topic prefix."""
    server = RabbitMQ(tmp_path_factory.mktemp("rabbitmq")).start()
    yield server
    server.stop()
