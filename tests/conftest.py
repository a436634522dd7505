"""Shared fixtures: real Mosquitto brokers on free ports, real agent processes, a test cloud.

Nothing here sleeps to synchronise: every wait polls a condition with a deadline and fails
with a message that says what did not happen.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, message: str) -> T:
    """Poll ``predicate`` until truthy; fail with ``message`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"{message} (within {timeout:g}s)")
        time.sleep(0.01)  # polling interval, not synchronisation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Mosquitto:
    """A mosquitto process of the test's own on 127.0.0.1; restartable on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, extra: str = "") -> None:
        """``extra``: more configuration lines (``password_file``, ``acl_file``, ...)."""
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.log = workdir / f"mosquitto-{self.port}.log"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
            "max_queued_messages 100000\n"
            "persistence false\n" + ("user root\n" if extra and os.geteuid() == 0 else "") + extra
            # As root mosquitto switches to its own user, which cannot read tmp_path.
        )

    def start(self) -> Mosquitto:
        if not os.path.exists(MOSQUITTO):
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(lambda: port_open(self.port), 10, f"mosquitto did not listen on {self.port}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None
        wait_for(lambda: not port_open(self.port), 10, f"port {self.port} still open")

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker per test: retained messages and sessions never leak between tests."""
    mosq = Mosquitto(tmp_path).start()
    yield mosq
    mosq.stop()


class NatsCluster:
    """A NATS cluster of ``size`` nodes on free loopback ports: JetStream (each node its own
    store dir), full-mesh cluster routes and the MQTT 3.1.1 listener on every node.

    NATS keeps MQTT sessions, retained messages and QoS 1 deliveries in replicated JetStream
    streams, so a client that loses its node can resume its session on another one.
    :meth:`kill` and :meth:`restart` act on one node, on the same ports and store dir.
    """

    def __init__(self, workdir: Path, size: int = 3, *, ack_wait: str = "30s") -> None:
        self.workdir = workdir
        self.size = size
        self.mqtt_ports = [free_port() for _ in range(size)]
        self.client_ports = [free_port() for _ in range(size)]
        self.route_ports = [free_port() for _ in range(size)]
        self.http_ports = [free_port() for _ in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.route_ports)
        self.confs: list[Path] = []
        self.logs: list[Path] = []
        for i in range(size):
            conf = workdir / f"nats-{i}.conf"
            conf.write_text(
                f"server_name: n{i}\n"
                f"listen: 127.0.0.1:{self.client_ports[i]}\n"
                f"http: 127.0.0.1:{self.http_ports[i]}\n"
                f'jetstream {{ store_dir: "{workdir / f"nats-js-{i}"}"\n'
                "  max_memory_store: 64MB\n  max_file_store: 1GB }\n"
                f"cluster {{ name: edge-test\n  listen: 127.0.0.1:{self.route_ports[i]}\n"
                f"  routes: [{routes}] }}\n"
                f"mqtt {{ listen: 127.0.0.1:{self.mqtt_ports[i]}\n  ack_wait: {ack_wait!r} }}\n"
            )
            self.confs.append(conf)
            self.logs.append(workdir / f"nats-{i}.log")

    @property
    def brokers(self) -> list[str]:
        """``host:port`` of every node's MQTT listener (``[mqtt] brokers``)."""
        return [f"127.0.0.1:{port}" for port in self.mqtt_ports]

    def start(self, timeout: float = 60.0) -> NatsCluster:
        if not os.path.exists(NATS_SERVER):
            pytest.skip("nats-server is not installed (apt-get install nats-server)")
        for i in range(self.size):
            self.start_node(i, wait=False)
        for i in range(self.size):
            self.wait_ready(i, timeout)
        return self

    def start_node(self, i: int, *, wait: bool = True, timeout: float = 60.0) -> None:
        with self.logs[i].open("ab") as log:
            self.procs[i] = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.confs[i])], stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            self.wait_ready(i, timeout)

    def wait_ready(self, i: int, timeout: float = 60.0) -> None:
        """Until node ``i`` takes an MQTT session with a QoS 1 subscription (JetStream up)."""
        port = self.mqtt_ports[i]
        wait_for(lambda: port_open(port), timeout, f"NATS node {i} did not listen on {port}")
        wait_for(
            lambda: _mqtt_session_works(port),
            timeout,
            f"NATS node {i} (MQTT {port}) never accepted a session with a QoS 1 subscription:"
            f"\n{self.logs[i].read_text(errors='replace')[-2000:]}",
        )

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(15)
        self.procs[i] = None

    def node_of(self, client_id: str) -> int | None:
        """The node an MQTT client (by client id) is connected to now, from /connz."""
        import urllib.request

        for i in self.alive():
            url = f"http://127.0.0.1:{self.http_ports[i]}/connz?limit=100000"
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    conns = json.load(answer).get("connections") or []
            except OSError:
                continue
            if any(c.get("mqtt_client") == client_id for c in conns):
                return i
        return None

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def stop(self) -> None:
        """SIGTERM every node, then SIGKILL what has not exited within 15 s (never leak)."""
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for i, proc in enumerate(self.procs):
            if proc is not None:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            self.procs[i] = None


def _mqtt_session_works(port: int) -> bool:
    """An MQTT 3.1.1 client connects, subscribes at QoS 1 and gets its SUBACK within 5 s."""
    done = threading.Event()
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"probe-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv311,
    )
    client.on_connect = lambda c, u, f, rc, p: (
        c.subscribe("probe/ready", qos=1) if not rc.is_failure else None
    )
    client.on_subscribe = lambda c, u, mid, rcs, p: (
        done.set() if all(not r.is_failure for r in rcs) else None
    )
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except OSError:
        return False
    client.loop_start()
    try:
        return done.wait(5)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A fresh 3-node NATS cluster (JetStream, MQTT listener) per test; its ack wait is 10 s
    (NATS's default is 30 s) so a message lost with a killed node comes back sooner."""
    cluster = NatsCluster(tmp_path, ack_wait="10s").start()
    yield cluster
    cluster.stop()


class Cloud:
    """The cloud side for tests: a raw paho client that records everything under the prefix."""

    def __init__(self, port: int, prefix: str = "edge", protocol: int = paho.MQTTv5) -> None:
        self.port = port
        self.prefix = prefix
        self.messages: list[tuple[str, bytes, Any]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"cloud-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
        )
        self.client.on_message = self._on_message
        self.client.on_socket_open = lambda c, u, s: s.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        self.client.connect("127.0.0.1", port)
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.loop_start()
        self.client.subscribe(f"{prefix}/#", qos=1)
        if not self._subscribed.wait(5):
            pytest.fail(f"test cloud could not subscribe on port {port}")

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), msg.properties))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, topic: str) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if t == topic and p]

    def wait_message(
        self,
        topic: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda m: True,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for msg in self.on(topic):
                if predicate(msg):
                    return msg
            return None

        return wait_for(find, timeout, f"no matching message on {topic}")  # type: ignore[no-any-return]

    def publish(self, topic: str, payload: Any, *, retain: bool = False, props: Any = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, data, qos=1, retain=retain, properties=props)
        info.wait_for_publish(5)

    def deploy(self, node: str | None, spec: dict[str, Any]) -> None:
        topic = (
            f"{self.prefix}/fleet/functions/{spec['id']}"
            if node is None
            else f"{self.prefix}/nodes/{node}/functions/{spec['id']}"
        )
        self.publish(topic, spec, retain=True)

    def invoke(
        self,
        node: str,
        function_id: str,
        payload: Any,
        *,
        request_id: str | None = None,
        timeout: float = 10.0,
        reply_to: str | None = None,
    ) -> dict[str, Any]:
        rid = request_id or uuid.uuid4().hex
        msg: dict[str, Any] = {"request_id": rid, "function_id": function_id, "payload": payload}
        if reply_to:
            msg["reply_to"] = reply_to
        self.publish(f"{self.prefix}/nodes/{node}/invoke", msg)
        topic = reply_to or f"{self.prefix}/nodes/{node}/replies"
        return self.wait_message(topic, lambda m: m.get("request_id") == rid, timeout)

    def invoke_v5(self, node: str, body: bytes, response_topic: str, correlation: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = response_topic
        props.CorrelationData = correlation
        self.publish(f"{self.prefix}/nodes/{node}/invoke", body, props=props)


@pytest.fixture
def cloud(broker: Mosquitto) -> Iterator[Cloud]:
    c = Cloud(broker.port)
    yield c
    c.close()


def source_spec(
    fid: str, source: str, *, version: str = "1", entrypoint: str | None = None, **over: Any
) -> dict[str, Any]:
    """A function spec with ``format: source`` (module name = the function id's)."""
    module = entrypoint.split(":")[0] if entrypoint else f"mod_{fid.replace('-', '_')}"
    spec: dict[str, Any] = {
        "id": fid,
        "name": fid,
        "version": version,
        "entrypoint": entrypoint or f"{module}:handler",
        "code": {
            "format": "source",
            "data": source,
            "sha256": hashlib.sha256(source.encode()).hexdigest(),
        },
        "memory_mb": 64,
        "timeout_seconds": 5,
    }
    spec.update(over)
    return spec


def zip_spec(fid: str, zip_bytes: bytes, entrypoint: str, **over: Any) -> dict[str, Any]:
    spec = source_spec(fid, "", entrypoint=entrypoint, **over)
    spec["code"] = {
        "format": "zip",
        "data": base64.b64encode(zip_bytes).decode(),
        "sha256": hashlib.sha256(zip_bytes).hexdigest(),
    }
    return spec


class AgentProcess:
    """``python -m agent run`` as a real subprocess with its own config and state dir."""

    def __init__(self, workdir: Path, port: int, node_id: str = "gw-test", **sections: Any) -> None:
        import tomli_w

        self.workdir = workdir
        self.node_id = node_id
        self.state_dir = workdir / f"state-{node_id}"
        self.config_path = workdir / f"{node_id}.toml"
        config: dict[str, Any] = {
            "node": {"id": node_id, "capabilities": ["python"]},
            "mqtt": {
                "host": "127.0.0.1",
                "port": port,
                "reconnect_min_s": 0.1,
                "reconnect_max_s": 1.0,
                "keepalive": 5,
            },
            "agent": {
                "state_dir": str(self.state_dir),
                "heartbeat_interval_s": 1.0,
                "log_level": "debug",
                "shutdown_grace_s": 5.0,
            },
            "runtime": {"prestart": 1, "max_workers": 4},
        }
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        self.config_path.write_text(tomli_w.dumps(config))
        self.log_path = workdir / f"agent-{node_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> AgentProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, **(env or {})},
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        wait_for(
            lambda: text in self.log(),
            timeout,
            f"agent log never said {text!r}:\n{self.log()[-3000:]}",
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"agent did not exit within {timeout}s:\n{self.log()[-3000:]}")

    def kill9(self) -> None:
        """SIGKILL the agent; its workers too (own sessions), as systemd's cgroup kill would."""
        assert self.proc is not None
        import psutil

        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.kill()
        self.proc.wait(10)
        for child in children:
            try:
                child.kill()
                child.wait(5)
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.proc = None


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


class NatsServer:
    """Debian's nats-server on free loopback ports with JetStream and the MQTT listener.

    What it shows that mosquitto does not: it speaks MQTT 3.1.1 only (an MQTT 5 CONNECT
    gets CONNACK "unsupported protocol version"), and it closes the connection on a
    publish to a topic with ``.`` (topics become subjects, where ``.`` separates tokens).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()  # MQTT
        self.nats_port = free_port()
        self.conf = workdir / f"nats-{self.port}.conf"
        self.log = workdir / f"nats-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf.write_text(
            f"server_name: edge-test-{self.port}\n"
            f"listen: 127.0.0.1:{self.nats_port}\n"
            f'jetstream {{ store_dir: "{workdir / f"nats-js-{self.port}"}" }}\n'
            f"mqtt {{ listen: 127.0.0.1:{self.port} }}\n"
        )

    def start(self) -> NatsServer:
        if not os.path.exists(NATS_SERVER):
            pytest.skip("nats-server is not installed (apt-get install nats-server)")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(lambda: port_open(self.port), 15, f"nats-server did not listen on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


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

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


class RabbitMQ:
    """A RabbitMQ node of the test's own: its own node name, ports, Mnesia and log
    directories and Erlang cookie (``HOME``) under ``workdir``, the MQTT plugin enabled from
    its own plugins file, listening on 127.0.0.1 only. Never the system's node: that one's
    name, ports, data and plugins stay untouched. Erlang's port mapper (epmd) is shared (or
    started, and left running, like any Erlang tool does)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir / f"rabbitmq-{uuid.uuid4().hex[:8]}"
        self.workdir.mkdir()
        self.port = free_port()  # MQTT
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.node = f"edge-test-{uuid.uuid4().hex[:10]}@localhost"
        self.log = self.workdir / "stdout.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\n"
            "loopback_users = none\n"
            "management_agent.disable_metrics_collector = true\n"
        )
        self.env = {
            **os.environ,
            "HOME": str(self.workdir),  # its own .erlang.cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_PID_FILE": str(self.workdir / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.workdir / "plugins-expand"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.workdir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),
        }

    def start(self, timeout: float = 90.0) -> RabbitMQ:
        server = RABBITMQ_BIN / "rabbitmq-server"
        if not server.exists():
            pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        started = time.monotonic()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(server)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=self.env,
                start_new_session=True,  # stop() can kill its whole process group
            )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"rabbitmq-server exited: {self.log.read_text()[-3000:]}")
            return port_open(self.port)

        wait_for(up, timeout, f"RabbitMQ's MQTT listener did not open on {self.port}")
        self.started_in = time.monotonic() - started
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, "stop"],
                env=self.env,
                cwd=self.workdir,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
            )
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    """One RabbitMQ node per test module (it takes 10-15 s to start); tests keep apart by
    topic prefix."""
    server = RabbitMQ(tmp_path_factory.mktemp("rabbitmq")).start()
    yield server
    server.stop()
