"""The reference broker ACL (``edgectl acl mosquitto``) on a real Mosquitto with a password
file: a node may not publish to another node's topics or to any spec topic (MQTT 5 PUBACK
reason >= 0x80, and a controller subscribed sees nothing arrive); a controller may."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.cloud import ctl
from testing.broker import Mosquitto
from testing.wait import wait_for

USERS = {"gw-1": "pw-gw-1", "gw-2": "pw-gw-2", "ctl": "pw-ctl"}


class Client:
    """A paho MQTT 5 client that records PUBACK reason codes and received messages."""

    def __init__(self, port: int, user: str | None) -> None:
        self.acks: dict[int, int] = {}
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{user or 'anon'}-{uuid.uuid4().hex[:6]}",
            protocol=paho.MQTTv5,
        )
        if user is not None:
            self.client.username_pw_set(user, USERS[user])
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        self.refused: Any = None
        self.client.on_connect = self._on_connect
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.refused = rc
        else:
            self.connected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._lock:
            self.acks[mid] = rc.value

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.received.append((msg.topic, bytes(msg.payload)))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish at QoS 1; the PUBACK's reason code (0 = accepted)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        wait_for(lambda: info.mid in self.acks, 5, f"no PUBACK for {topic}")
        with self._lock:
            return self.acks[info.mid]

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(5), f"no SUBACK for {topic}"

    def got(self, topic: str, payload: bytes) -> bool:
        with self._lock:
            return (topic, payload) in self.received

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _ in self.received]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def acl_broker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Mosquitto]:
    passwd = shutil.which("mosquitto_passwd") or pytest.skip("mosquitto_passwd is missing")
    password_file = tmp_path / "passwd"
    for user, password in USERS.items():
        create = ["-c"] if not password_file.exists() else []
        subprocess.run([passwd, *create, "-b", str(password_file), user, password], check=True)
    assert ctl.main(["acl", "mosquitto", "--nodes", "gw-1,gw-2", "--controllers", "ctl"]) == 0
    acl_file = tmp_path / "acl"
    acl_file.write_text(capsys.readouterr().out)
    mosq = Mosquitto(tmp_path)
    mosq.conf.write_text(
        f"listener {mosq.port} 127.0.0.1\n"
        "allow_anonymous false\n"
        f"password_file {password_file}\n"
        f"acl_file {acl_file}\n"
        "set_tcp_nodelay true\n"
        "persistence false\n" + ("user root\n" if os.geteuid() == 0 else "")
        # As root, mosquitto would switch to its own user, which cannot read tmp_path.
    )
    mosq.start()
    yield mosq
    mosq.stop()


@pytest.fixture
def clients(acl_broker: Mosquitto) -> Iterator[dict[str, Client]]:
    made = {user: Client(acl_broker.port, user) for user in USERS}
    for user, client in made.items():
        assert client.connected.wait(5), f"{user} could not connect: {client.refused}"
    made["ctl"].subscribe("edge/#")
    yield made
    for client in made.values():
        client.close()


def test_acl_text_names_every_node_topic() -> None:
    text = ctl.mosquitto_acl("edge", ["gw-1"], ["ctl"])
    assert "user ctl\ntopic readwrite edge/#" in text
    for line in (
        "topic write edge/nodes/gw-1/status",
        "topic write edge/nodes/gw-1/functions/+/state",
        "topic write edge/controllers/+/replies",
        "topic read edge/fleet/functions/+",
        "topic read edge/nodes/gw-1/invoke",
    ):
        assert line in text
    assert text.index("user ctl") < text.index("user gw-1")
    assert not any(line.startswith("topic") for line in text.split("user")[0].splitlines())


FORBIDDEN_FOR_GW1 = [
    "edge/nodes/gw-2/status",  # another node's status
    "edge/nodes/gw-2/functions/f/state",
    "edge/nodes/gw-2/sync/delta",
    "edge/fleet/functions/f",  # any spec topic
    "edge/nodes/gw-1/functions/f",  # its own spec topic too
    "edge/nodes/gw-2/functions/f",
    "edge/nodes/gw-2/invoke",  # invokes and desired state are the controllers'
    "edge/nodes/gw-1/invoke",
    "edge/nodes/gw-1/sync/desired",
]


def test_attack_node_publishing_specs_or_other_nodes_topics_is_refused_by_the_acl(
    clients: dict[str, Client],
) -> None:
    """A node could publish specs and impersonate other nodes: the ACL refuses it."""
    gw1, controller = clients["gw-1"], clients["ctl"]
    for topic in FORBIDDEN_FOR_GW1:
        reason = gw1.publish(topic, b'{"attack":true}', retain=True)
        assert reason >= 0x80, f"{topic}: PUBACK reason {reason:#x}, expected a refusal"
    fence = uuid.uuid4().hex.encode()
    assert gw1.publish("edge/nodes/gw-1/status", fence) == 0  # its own topic: allowed
    wait_for(lambda: controller.got("edge/nodes/gw-1/status", fence), 5, "fence never arrived")
    leaked = set(controller.topics()) & set(FORBIDDEN_FOR_GW1)
    assert not leaked, f"the controller received refused publishes on {sorted(leaked)}"


def test_controller_publishes_specs_and_the_node_reads_them(clients: dict[str, Client]) -> None:
    """Only controllers publish specs, invokes and desired state; nodes read theirs."""
    gw1, controller = clients["gw-1"], clients["ctl"]
    gw1.subscribe("edge/fleet/functions/+")
    gw1.subscribe("edge/nodes/gw-1/#")
    for topic in (
        "edge/fleet/functions/f",
        "edge/nodes/gw-1/functions/f",
        "edge/nodes/gw-1/invoke",
    ):
        assert controller.publish(topic, b"{}") == 0, topic
        wait_for(lambda t=topic: gw1.got(t, b"{}"), 5, f"gw-1 never received {topic}")  # type: ignore[misc]
    assert gw1.publish("edge/nodes/gw-1/replies", b"r") == 0
    assert gw1.publish("edge/controllers/ctl-1/replies", b"r") == 0
    assert gw1.publish("edge/nodes/gw-1/heartbeat", b"h") == 0
    wait_for(lambda: controller.got("edge/nodes/gw-1/heartbeat", b"h"), 5, "no heartbeat")
    assert controller.publish("edge/nodes/gw-2/invoke", b"x") == 0
    assert not gw1.got("edge/nodes/gw-2/invoke", b"x")  # gw-1 did not subscribe there


def test_anonymous_client_is_refused(acl_broker: Mosquitto) -> None:
    """With the reference setup anonymous clients cannot even connect."""
    anon = Client(acl_broker.port, None)
    try:
        wait_for(lambda: anon.refused is not None, 5, "anonymous connect was not refused")
        assert not anon.connected.is_set()
    finally:
        anon.close()


def test_edgectl_deploy_the_broker_refuses_exits_1_naming_the_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A spec publish the broker refused (PUBACK 0x87) was reported as sent."""
    passwd = shutil.which("mosquitto_passwd") or pytest.skip("mosquitto_passwd is missing")
    password_file, secret = tmp_path / "passwd", tmp_path / "ops.secret"
    subprocess.run([passwd, "-c", "-b", str(password_file), "ops", "pw-ops"], check=True)
    secret.write_text("pw-ops")
    acl = tmp_path / "acl"  # an operator who may watch and invoke, not deploy
    acl.write_text(
        "user ops\ntopic read edge/#\ntopic write edge/nodes/+/invoke\n"
        "topic readwrite edge/controllers/#\n"
    )
    mosq = Mosquitto(tmp_path)
    mosq.conf.write_text(
        f"listener {mosq.port} 127.0.0.1\nallow_anonymous false\n"
        f"password_file {password_file}\nacl_file {acl}\npersistence false\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    mosq.start()
    handler = tmp_path / "h.py"
    handler.write_text("def handler(event):\n    return event\n")
    try:
        capsys.readouterr()
        code = ctl.main(
            [
                *("--broker", f"127.0.0.1:{mosq.port}", "--connect-timeout", "5"),
                *("--username", "ops", "--password-file", str(secret)),
                *("deploy", str(handler), "--id", "f", "--node", "gw-1", "--no-wait"),
            ]
        )
    finally:
        mosq.stop()
    err = capsys.readouterr().err
    assert code == 1, err
    assert "refused the publish to edge/nodes/gw-1/functions/f" in err, err
