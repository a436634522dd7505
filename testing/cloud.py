"""The cloud side of the harness: a recording MQTT client, and the fleet controller's connect.

Owns :class:`Cloud` (a raw paho client on the broker that records every message under the
prefix, publishes specs and invokes, and waits for the message it wants), :func:`connect`
(an :class:`~agent.local.cluster.EdgeCluster` on a local broker) and :func:`wait_status`
(until the controller sees a node online/offline). Used by tests and by scripts/demo.py.

It must never decode the wire contract by other rules than JSON: what the agent sends is
checked by the tests, not reinterpreted here.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.local.cluster import EdgeCluster
from agent.models import EdgeNode, EdgeNodeStatus
from testing.outcomes import fail
from testing.wait import wait_for


def nodelay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """paho's ``on_socket_open``: paho leaves Nagle on, and a QoS 1 round trip would then
    wait on delayed ACKs."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Cloud:
    """The cloud side for tests and the demo: a raw paho client that records everything under
    the prefix (and on ``topics``, e.g. a reply topic of the caller's own)."""

    def __init__(
        self,
        port: int,
        prefix: str = "edge",
        protocol: MQTTProtocolVersion = paho.MQTTv5,
        *,
        topics: Sequence[str] = (),
    ) -> None:
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
        self.client.on_socket_open = nodelay
        self.client.connect("127.0.0.1", port)
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.loop_start()
        self.client.subscribe([(f"{prefix}/#", 1), *((topic, 1) for topic in topics)])
        if not self._subscribed.wait(5):
            fail(f"test cloud could not subscribe on port {port}")

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
        *,
        poll: float = 0.01,
    ) -> dict[str, Any]:
        """The first message on ``topic`` that ``predicate`` accepts, polled every ``poll`` s."""

        def find() -> dict[str, Any] | None:
            for msg in self.on(topic):
                if predicate(msg):
                    return msg
            return None

        return wait_for(find, timeout, f"no matching message on {topic}", poll=poll)

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
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = response_topic
        props.CorrelationData = correlation
        self.publish(f"{self.prefix}/nodes/{node}/invoke", body, props=props)


def connect(port: int, **kwargs: Any) -> EdgeCluster:
    """The fleet controller (``EdgeCluster``) on the broker at 127.0.0.1:``port``."""
    kwargs.setdefault("timeout", 10.0)
    return EdgeCluster.connect("127.0.0.1", port, **kwargs)


def wait_status(
    cluster: EdgeCluster, node_id: str, status: EdgeNodeStatus, timeout: float = 10.0
) -> EdgeNode:
    """Until the controller sees ``node_id`` with ``status``; that node."""

    def check() -> EdgeNode | None:
        node = cluster.get_node(node_id)
        return node if node is not None and node.status is status else None

    return wait_for(check, timeout, f"{node_id} did not become {status.value}")
