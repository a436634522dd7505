"""The brokers the harness starts: mosquitto, a NATS cluster, one nats-server, RabbitMQ.

Owns every broker process of tests and scripts alike: each on free loopback ports of its
own, with its own config and log under a work directory, stopped without leaking. Nothing
outside ``testing/`` may launch mosquitto or nats-server itself (tests/test_harness.py
checks). A missing program is reported through :func:`testing.outcomes.skip` (a skipped
test, or :class:`testing.outcomes.Unavailable` in a script).

It must never touch the system's own broker services, their ports or their data.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from testing.outcomes import fail, skip
from testing.ports import free_port, port_open
from testing.wait import wait_for

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


class Mosquitto:
    """A mosquitto process of the caller's own on 127.0.0.1; restartable on the same port.

    The configuration every user shares: anonymous, ``set_tcp_nodelay`` (a QoS 1 round trip
    never waits on delayed ACKs), a deep queue, no persistence. ``extra``: more configuration
    lines (``password_file``, ``acl_file``, ``max_inflight_messages 0``, ...).
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra: str = "",
        *,
        max_queued_messages: int = 100_000,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        #: ``time.monotonic()`` when the last :meth:`start` first accepted a TCP connection.
        self.started_at: float | None = None
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.log = workdir / f"mosquitto-{self.port}.log"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
            f"max_queued_messages {max_queued_messages}\n"
            "persistence false\n" + ("user root\n" if extra and os.geteuid() == 0 else "") + extra
            # As root mosquitto switches to its own user, which cannot read tmp_path.
        )

    def start(self) -> Mosquitto:
        if not os.path.exists(MOSQUITTO):
            skip("mosquitto is not installed (apt-get install mosquitto)")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(
            lambda: port_open(self.port), 10, f"mosquitto did not listen on {self.port}", poll=0.002
        )
        self.started_at = time.monotonic()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal it (SIGTERM), wait for it (SIGKILL after 10 s) and for its port to close."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        wait_for(lambda: not port_open(self.port), 10, f"port {self.port} still open")

    def restart(self) -> None:
        self.stop()
        self.start()


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
            skip("nats-server is not installed (apt-get install nats-server)")
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
            lambda: mqtt_session_works(port),
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


def mqtt_session_works(port: int) -> bool:
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


def nats_server_version() -> str:
    """``nats-server --version`` (for reports), or "" when it is not installed."""
    if not os.path.exists(NATS_SERVER):
        return ""
    done = subprocess.run([NATS_SERVER, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


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
            skip("nats-server is not installed (apt-get install nats-server)")
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
            skip("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
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
                fail(f"rabbitmq-server exited: {self.log.read_text()[-3000:]}")
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
