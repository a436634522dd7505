"""The agent against brokers that ask for credentials: mutual TLS, and username/password.

Each test runs a mosquitto with two listeners on 127.0.0.1: a guarded one for the agent and
an open one for the test's cloud client (``per_listener_settings``), and a throw-away PKI
made with the openssl command line.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.ports import free_port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

NODE = "gw-secure"
STATUS = f"edge/nodes/{NODE}/status"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    d = tmp_path / "pki"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", *ext, cwd=d)  # fmt: skip
    return d


class TwoListenerBroker(Mosquitto):
    """A guarded listener (``guarded_port``) for the agent, an open one (``port``) for tests."""

    def __init__(self, workdir: Path, guarded: str) -> None:
        super().__init__(workdir)
        self.guarded_port = free_port()
        # Started as root, mosquitto drops to its own user, which cannot read tmp_path:
        # stay the user we are (the option is ignored when not root).
        self.conf.write_text(
            f"user {getpass.getuser()}\nper_listener_settings true\n"
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"listener {self.guarded_port} 127.0.0.1\n{guarded}\n"
        )


@pytest.fixture
def two_listener_broker(tmp_path: Path) -> Iterator[Callable[[str], TwoListenerBroker]]:
    started: list[TwoListenerBroker] = []

    def make(guarded: str) -> TwoListenerBroker:
        broker = TwoListenerBroker(tmp_path, guarded).start()
        assert isinstance(broker, TwoListenerBroker)
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.stop()


def start_agent(tmp_path: Path, port: int, **mqtt: object) -> AgentProcess:
    return AgentProcess(tmp_path, port, NODE, mqtt={"reconnect_max_s": 0.5, **mqtt}).start()


def test_agent_connects_with_mutual_tls(
    tmp_path: Path, pki: Path, two_listener_broker: Callable[[str], TwoListenerBroker]
) -> None:
    """With tls = true, a CA file and a client certificate, the agent gets through a broker
    that requires client certificates, and says so with its retained online status."""
    broker = two_listener_broker(
        f"cafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\nkeyfile {pki / 'server.key'}\n"
        "require_certificate true\nallow_anonymous true"
    )
    cloud = Cloud(broker.port)
    agent = start_agent(
        tmp_path,
        broker.guarded_port,
        tls=True,
        ca_file=str(pki / "ca.crt"),
        cert_file=str(pki / "client.crt"),
        key_file=str(pki / "client.key"),
    )
    try:
        status = cloud.wait_message(STATUS, lambda m: m["status"] == "online", timeout=15)
        assert status["node_id"] == NODE
    finally:
        agent.stop()
        cloud.close()


def test_agent_without_client_certificate_is_refused_and_keeps_running(
    tmp_path: Path, pki: Path, two_listener_broker: Callable[[str], TwoListenerBroker]
) -> None:
    """A TLS handshake the broker refuses is retried with backoff; the agent stays up."""
    broker = two_listener_broker(
        f"cafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\nkeyfile {pki / 'server.key'}\n"
        "require_certificate true\nallow_anonymous true"
    )
    agent = start_agent(tmp_path, broker.guarded_port, tls=True, ca_file=str(pki / "ca.crt"))
    try:
        agent.wait_log("broker unreachable", timeout=15)
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()[-2000:]
        assert "connected to the broker" not in agent.log()
    finally:
        agent.stop()


def test_agent_authenticates_with_username_and_password_file(
    tmp_path: Path, two_listener_broker: Callable[[str], TwoListenerBroker]
) -> None:
    """The password comes from mqtt.password_file; the broker lets the agent in with it."""
    passwd = tmp_path / "mosquitto.passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), "gw", "s3cret pass"],
        check=True,
        capture_output=True,
    )
    broker = two_listener_broker(f"allow_anonymous false\npassword_file {passwd}")
    secret = tmp_path / "password"
    secret.write_text("s3cret pass\n")
    cloud = Cloud(broker.port)
    agent = start_agent(tmp_path, broker.guarded_port, username="gw", password_file=str(secret))
    try:
        cloud.wait_message(STATUS, lambda m: m["status"] == "online", timeout=15)
    finally:
        agent.stop()
        cloud.close()


def test_wrong_password_is_refused_and_retried(
    tmp_path: Path, two_listener_broker: Callable[[str], TwoListenerBroker]
) -> None:
    """A broker that refuses the credentials is logged and retried; the agent stays up."""
    passwd = tmp_path / "mosquitto.passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), "gw", "right"],
        check=True,
        capture_output=True,
    )
    broker = two_listener_broker(f"allow_anonymous false\npassword_file {passwd}")
    secret = tmp_path / "password"
    secret.write_text("wrong\n")
    agent = start_agent(tmp_path, broker.guarded_port, username="gw", password_file=str(secret))
    try:
        agent.wait_log("broker refused", timeout=15)
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()[-2000:]
    finally:
        agent.stop()
