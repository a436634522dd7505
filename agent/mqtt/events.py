"""The events :class:`~agent.mqtt.client.MqttClient` hands to its sink: plain values.

Owns :data:`MqttEvent` (:class:`Connected`, :class:`ConnectFailed`, :class:`Disconnected`,
:class:`Message`, :class:`Published`) and :data:`PROTOCOL_REFUSED`, the words every refusal
of the protocol version says. The daemon's loop, the controller and the mirror read these;
tests build them by hand.

Must never: import paho or hold a paho object (a paho message does not outlive its callback),
or decide anything about what an event means.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Connected:
    session_present: bool


@dataclass(frozen=True)
class ConnectFailed:
    reason: str


@dataclass(frozen=True)
class Disconnected:
    reason: str


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    response_topic: str | None = None
    correlation_data: bytes | None = None
    #: Which connection delivered it: packet ids are only meaningful within one.
    connection: int = 0
    #: The broker's DUP flag: it sent this message before (a redelivery, not a new publish).
    dup: bool = False


@dataclass(frozen=True)
class Published:
    """The broker's answer to a QoS 1 publish (PUBACK), or paho's note that a QoS 0 left.

    ``reason_code`` is the MQTT 5 PUBACK reason code: below 0x80 the broker took the message
    (0x10 "no matching subscribers" included); 0x80 and above it refused it and the message
    is NOT delivered. MQTT 3.1.1 has no reason codes: always 0 there.
    """

    mid: int
    reason_code: int = 0
    reason: str = "Success"

    @property
    def refused(self) -> bool:
        return self.reason_code >= 0x80


MqttEvent = Connected | ConnectFailed | Disconnected | Message | Published

#: Words every refusal of the protocol version says (edgectl looks for them).
PROTOCOL_REFUSED = "does not accept MQTT"
