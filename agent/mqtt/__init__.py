"""MQTT for both sides (the gateway daemon and the cloud controller), in three modules:

- :mod:`.settings`: :class:`MqttSettings` (from the agent's config, or for a controller), the
  Last :class:`Will`, the packet-size rule and the reconnect backoff;
- :mod:`.events`: the plain :data:`MqttEvent` values a connection hands to its sink
  (:class:`Message`, :class:`Connected`, :class:`Disconnected`, :class:`ConnectFailed`,
  :class:`Published`) and :data:`PROTOCOL_REFUSED`;
- :mod:`.client`: :class:`MqttClient`, the connection itself: the only module in the project
  that imports paho (:mod:`.pubacks`, :mod:`.version` and :mod:`.wake` are its helpers).

This module re-exports their public names, so ``from agent import mqtt`` then
``mqtt.Message``, and ``from agent.mqtt import MqttSettings, PROTOCOL_REFUSED``, keep working.
:class:`MqttClient` is loaded on first use, so importing the package, its settings or its
events never loads paho. Must never: hold logic of its own, or import paho eagerly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.errors import MqttError  # defined with the whole tree; raised by MqttClient
from agent.mqtt.events import (
    PROTOCOL_REFUSED,
    Connected,
    ConnectFailed,
    Disconnected,
    Message,
    MqttEvent,
    Published,
)
from agent.mqtt.settings import (
    CONTROLLER_CONNECT_TIMEOUT_MAX_S,
    CONTROLLER_RECONNECT_MAX_S,
    CONTROLLER_RECONNECT_MIN_S,
    ONE_SHOT_RECONNECT_MAX_S,
    PACKET_HEADER_ROOM,
    MqttSettings,
    Will,
    backoff_delay,
    list_backoff_delay,
    max_packet_size,
)

__all__ = [
    "CONTROLLER_CONNECT_TIMEOUT_MAX_S",
    "CONTROLLER_RECONNECT_MAX_S",
    "CONTROLLER_RECONNECT_MIN_S",
    "ONE_SHOT_RECONNECT_MAX_S",
    "PACKET_HEADER_ROOM",
    "PROTOCOL_REFUSED",
    "ConnectFailed",
    "Connected",
    "Disconnected",
    "Message",
    "MqttClient",
    "MqttError",
    "MqttEvent",
    "MqttSettings",
    "Published",
    "Will",
    "backoff_delay",
    "list_backoff_delay",
    "max_packet_size",
]

if TYPE_CHECKING:
    from agent.mqtt.client import MqttClient
else:

    def __getattr__(name: str) -> object:
        """``MqttClient`` on first use: the one name that needs paho."""
        if name != "MqttClient":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from agent.mqtt.client import MqttClient

        globals()[name] = MqttClient
        return MqttClient
