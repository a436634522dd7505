"""``protocol = "auto"``: which MQTT version the next CONNECT speaks, and what a refusal says.

Owns the fall-back rule: MQTT 5 first; a CONNACK refusing the version ("unsupported protocol
version": 0x84 in MQTT 5, 1 in 3.1.1) or the connection closed during CONNECT twice in a row
(what 3.1.1-only brokers such as NATS or RabbitMQ 3.10 do) moves to 3.1.1; a fall-back made
on closes alone goes back to 5 when 3.1.1 is closed on as well (then the closes were not
about the version: a proxy whose broker is down). Also owns the wording of every refused
CONNECT, each version refusal carrying :data:`~agent.mqtt.events.PROTOCOL_REFUSED`.

Must never: import paho or touch the connection: :class:`~agent.mqtt.client.MqttClient`
switches paho's CONNECT fields, logs and reports; this only counts, decides and words.
"""

from __future__ import annotations

from typing import Literal

from agent.mqtt.events import PROTOCOL_REFUSED

#: CONNACK codes meaning "not this protocol version": 0x84 (MQTT 5), 1 (3.1.1's own).
_UNSUPPORTED_VERSION = (0x84, 0x01)
#: Closed during CONNECT this many times in a row: "auto" takes it for a version refusal.
_CLOSES_BEFORE_FALLBACK = 2

#: What a close during CONNECT asks of the client: try 3.1.1, go back to 5, or nothing.
Switch = Literal["fall_back", "back_to_5"] | None


class VersionChoice:
    """The version state of one connection (network thread only, like paho's callbacks)."""

    def __init__(self, protocol: str) -> None:
        #: As configured: "5", "3.1.1" or "auto".
        self.protocol = protocol
        #: The version in use: "5" or "3.1.1" ("auto" starts with 5).
        self.active = "3.1.1" if protocol == "3.1.1" else "5"
        self.connack = False  # a CONNACK came on the current socket
        self.closed_in_connect = 0  # sockets closed before any CONNACK, in a row
        self.fell_back_on_close = False  # on 3.1.1 because 5 was closed on, not refused

    def socket_opened(self) -> None:
        self.connack = False

    def connack_received(self) -> None:
        self.connack = True
        self.closed_in_connect = 0

    def refused(self, host: str, port: int, code: int, reason: str) -> tuple[str, bool]:
        """A CONNACK refused the connection: the reason to report, and whether it refused
        the protocol version (then the client calls :meth:`fall_back`)."""
        if code in _UNSUPPORTED_VERSION:
            why = f"broker {host}:{port} {PROTOCOL_REFUSED} {self.active} (CONNACK: {reason})"
            return why, True
        return f"broker refused the connection at {host}:{port}: {reason}", False

    def closed(self, host: str, port: int, reason: str) -> tuple[str, Switch]:
        """The socket closed before any CONNACK: the reason to report (without the Will's
        hint, :func:`will_hint`) and what the client should switch to."""
        self.closed_in_connect += 1
        n, version = self.closed_in_connect, self.active
        what = f"broker {host}:{port} closed the connection during CONNECT"
        if version == "5" and n >= _CLOSES_BEFORE_FALLBACK:
            why = f"{what} {n} times in a row: it {PROTOCOL_REFUSED} 5"
        elif version == "5":
            why = f"{what} ({reason}): it may not accept MQTT 5"
        else:
            why = f"{what}{f' {n} times in a row' if n > 1 else ''} ({reason}, MQTT {version})"
        if self.closed_in_connect < _CLOSES_BEFORE_FALLBACK:
            return why, None
        if self.fell_back_on_close and self.active == "3.1.1":
            return why, "back_to_5"  # 3.1.1 is closed on too: not the version
        return why, "fall_back"

    def fall_back(self, *, on_close: bool = False) -> bool:
        """With ``protocol = "auto"`` on 5, make the next attempt 3.1.1; False: no change."""
        if self.protocol != "auto" or self.active != "5":
            return False
        self.active = "3.1.1"
        self.closed_in_connect = 0
        self.fell_back_on_close = on_close
        return True

    def back_to_5(self) -> None:
        """A fall-back made on closed connections alone, and 3.1.1 is closed on as well."""
        self.active = "5"
        self.closed_in_connect = 0
        self.fell_back_on_close = False


def will_hint(topic: str) -> str:
    """Why a broker may close every CONNECT whatever the version: the Will's topic."""
    if "." not in topic and " " not in topic:
        return ""
    return (
        f"; the Last Will's topic {topic!r} has a '.' or a space, which brokers that map "
        'topics to subjects (NATS) refuse: mqtt.topic_charset = "portable" makes '
        "check-config refuse such a topic_prefix"
    )
