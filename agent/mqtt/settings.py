"""MQTT connection settings: the one place they are decided, for the agent and the cloud side.

Owns :class:`MqttSettings` (:meth:`~MqttSettings.from_config` for the agent,
:meth:`~MqttSettings.for_controller` for ``edgectl`` and ``EdgeCluster``), the Last
:class:`Will`, the Maximum Packet Size rule and the full-jitter reconnect backoff
(:func:`backoff_delay`, :func:`list_backoff_delay`; the outbox uses the same curve).

Must never: import paho (only :mod:`agent.mqtt.client` does; ``edgectl``'s flags and the
daemon's config become settings without loading the network stack), open sockets or files.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import Config

#: Reconnect backoff of the cloud side (:meth:`MqttSettings.for_controller`): from this...
CONTROLLER_RECONNECT_MIN_S = 0.2
#: ...up to this for a long-running controller (``EdgeCluster.connect``)...
CONTROLLER_RECONNECT_MAX_S = 5.0
#: ...and up to this for a one-shot command (``edgectl``), which an operator waits on.
ONE_SHOT_RECONNECT_MAX_S = 2.0
#: The longest a controller's CONNECT waits, whatever the overall timeout.
CONTROLLER_CONNECT_TIMEOUT_MAX_S = 10.0


@dataclass(frozen=True)
class MqttSettings:
    """Connection settings: :meth:`from_config` for the agent, :meth:`for_controller` for the
    cloud side (both decide everything in one place); tests may build them directly."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    keepalive: int = 30
    #: "5", "3.1.1" or "auto" (5, falling back to 3.1.1 when the broker refuses it).
    protocol: str = "5"
    username: str = ""
    password_file: str = ""
    password: str = ""  # only for the cloud-side API; the agent reads password_file
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_insecure: bool = False
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    session_expiry_s: int = 3600
    connect_timeout_s: float = 10.0
    clean_start: bool = False
    max_inflight: int = 100
    #: MQTT 5 Maximum Packet Size announced in CONNECT; 0: none (the protocol's own limit).
    max_packet_size: int = 0
    #: The nodes of a clustered broker; when non-empty it replaces ``host``/``port``.
    brokers: tuple[tuple[str, int], ...] = ()
    #: With a broker list: a QoS 1 publish unacknowledged this long means the broker node
    #: dropped it (NATS during a leader election): the connection is dropped, so paho sends
    #: it again (DUP) on the next connection, to the next node. 0 turns this off.
    puback_timeout_s: float = 20.0

    @classmethod
    def from_config(cls, config: Config) -> MqttSettings:
        """The agent's settings: ``[mqtt]`` as configured (a persistent session).

        The Maximum Packet Size is the larger of ``agent.max_payload_bytes`` and
        ``agent.max_spec_bytes`` plus header room: the broker never sends more (MQTT 5), so a
        huge spec or invoke is not even buffered.
        """
        m = config.mqtt
        return cls(
            host=m.host,
            port=m.port,
            brokers=m.endpoints() if m.brokers else (),
            client_id=m.client_id,
            keepalive=m.keepalive,
            protocol=m.protocol,
            username=m.username,
            password_file=m.password_file,
            tls=m.tls,
            ca_file=m.ca_file,
            cert_file=m.cert_file,
            key_file=m.key_file,
            tls_insecure=m.tls_insecure,
            reconnect_min_s=m.reconnect_min_s,
            reconnect_max_s=m.reconnect_max_s,
            session_expiry_s=m.session_expiry_s,
            connect_timeout_s=m.connect_timeout_s,
            max_packet_size=max_packet_size(
                max(config.agent.max_payload_bytes, config.agent.max_spec_bytes)
            ),
        )

    @classmethod
    def for_controller(
        cls,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        brokers: Sequence[tuple[str, int]] = (),
        one_shot: bool,
        timeout_s: float = 10.0,
        protocol: str = "5",
        username: str = "",
        password: str = "",
        password_file: str = "",
        tls: bool = False,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
    ) -> MqttSettings:
        """The cloud side's settings (a fleet controller: ``edgectl``, ``EdgeCluster``).

        A clean session that the broker forgets at once (``clean_start``, expiry 0): the
        controller re-reads the retained state on every connection and queues nothing while
        away. Reconnects start after :data:`CONTROLLER_RECONNECT_MIN_S`; the cap depends on
        ``one_shot``: an ``edgectl`` command (True) is one short-lived call an operator waits
        on, so it tries again soon (:data:`ONE_SHOT_RECONNECT_MAX_S`); a long-running
        controller (False, ``EdgeCluster.connect``) backs off further
        (:data:`CONTROLLER_RECONNECT_MAX_S`). One CONNECT waits at most ``timeout_s``,
        capped at :data:`CONTROLLER_CONNECT_TIMEOUT_MAX_S` so a broker list moves on.
        """
        return cls(
            host=host,
            port=port,
            brokers=tuple(brokers),
            protocol=protocol,
            username=username,
            password=password,
            password_file=password_file,
            tls=tls,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            clean_start=True,
            session_expiry_s=0,
            reconnect_min_s=CONTROLLER_RECONNECT_MIN_S,
            reconnect_max_s=ONE_SHOT_RECONNECT_MAX_S if one_shot else CONTROLLER_RECONNECT_MAX_S,
            connect_timeout_s=min(timeout_s, CONTROLLER_CONNECT_TIMEOUT_MAX_S),
        )

    def endpoints(self) -> tuple[tuple[str, int], ...]:
        return self.brokers or ((self.host, self.port),)

    def describe(self) -> str:
        """``host:port`` or the list, for messages."""
        return ", ".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in self.endpoints())


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


#: Room for a PUBLISH's fixed header, topic (up to 64 KiB) and properties (Response Topic
#: and Correlation Data, up to 64 KiB each) next to the payload.
PACKET_HEADER_ROOM = 4 * 65536


def max_packet_size(max_payload: int) -> int:
    """The Maximum Packet Size to announce for payloads up to ``max_payload`` bytes."""
    return min(max_payload + PACKET_HEADER_ROOM, 268_435_460)  # the protocol's own limit


def backoff_delay(attempt: int, low: float, high: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [low, min(high, low * 2**attempt)]."""
    ceiling = min(high, low * (2 ** min(attempt, 32)))
    return rng.uniform(low, max(low, ceiling))


def list_backoff_delay(
    attempt: int, brokers: int, low: float, high: float, rng: random.Random
) -> float:
    """Backoff over a list of ``brokers``: the exponent grows per full pass over the list.

    One broker: :func:`backoff_delay`. Several: the first pass waits between ``low`` and
    ``2 * low`` before each entry (jittered: a fleet leaving a dead node does not arrive at
    the next one in lock-step), and each further pass doubles the ceiling up to ``high``.
    """
    if brokers <= 1:
        return backoff_delay(attempt, low, high, rng)
    return backoff_delay(attempt // brokers + 1, low, high, rng)
