"""The loop's view of its MQTT connection: the client (once ``cli.build_agent`` assigns it) and
whether it is connected now, shared by the collaborators that publish.

Owns: the :class:`Transport` protocol, the subset of :class:`agent.mqtt.MqttClient` the loop
and its collaborators call (a test hands in a fake one: ``testing.fakes.FakeMqttClient``);
the connected flag the loop sets on ``Connected`` / ``Disconnected`` events.

Must never: import paho, keep messages (the outbox does), or decide what is owed the cloud.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from agent.mqtt import Message


class Transport(Protocol):
    """What the daemon needs of an MQTT client (``agent.mqtt.MqttClient`` in production)."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
    ) -> int: ...

    def ack(self, msg: Message) -> None: ...

    def corked(self) -> AbstractContextManager[None]:
        """Publishes and acks made inside (from the loop's thread) are queued as they are
        made, in order; only the wake-up of the client's network thread is held back and
        sent once, at the end (one per loop batch instead of one per call)."""
        ...

    def forget(self, mid: int) -> bool: ...

    def subscribe(self, topics: list[str], qos: int = 1) -> None: ...

    def unsubscribe(self, topics: list[str]) -> None: ...


class Uplink:
    """The client (None until assigned) and the loop's view of the connection."""

    def __init__(self) -> None:
        self.client: Transport | None = None
        #: Set by the loop thread only (``handle_connected`` / ``handle_disconnected``).
        self.connected = False

    @property
    def live(self) -> bool:
        """Connected, with a client to publish through."""
        return self.connected and self.client is not None

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
    ) -> int:
        """Hand a message to the client; its MQTT message id. Only with a client."""
        assert self.client is not None
        return self.client.publish(
            topic, payload, qos=qos, retain=retain, correlation_data=correlation
        )

    def publish_item(
        self, topic: str, payload: bytes, qos: int, retain: bool, correlation: bytes | None
    ) -> int:
        """The outbox pump's publish (``agent.edge.outbox.Publish``)."""
        return self.publish(topic, payload, qos=qos, retain=retain, correlation=correlation)

    def ack(self, msg: Message) -> None:
        """Acknowledge an incoming message to the broker (a no-op without a client)."""
        if self.client is not None:
            self.client.ack(msg)
