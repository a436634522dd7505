"""paho's ``Client`` with what the agent changes in it (:class:`PahoClient`); only
:mod:`agent.mqtt.client` uses it.

- Broker rotation: ``endpoint()`` is asked where to go before every (re)connect.
- Buffered reads: its socket is read through :mod:`agent.mqtt.bufsock`.
- The two packets the agent receives most are decoded here, as paho decodes them, without
  its per-packet objects: an MQTT 5 QoS 1 PUBLISH without properties (an invoke, a spec)
  and a 2-byte PUBACK (a delivery). Every other packet is paho's own, malformed ones
  included (``tests/test_mqtt_decode.py`` feeds the same packets to both decoders).
- :meth:`PahoClient.write_now`: the daemon's loop writes a small batch itself on plain TCP,
  under a lock that paho's own writes take.

These override private methods of paho-mqtt (``_create_socket``, ``_handle_publish``,
``_handle_pubackcomp``, ``_packet_write``); ``uv.lock`` pins the version, and the tests
compare every one of them with paho's own behaviour.

Must never: decide anything about the agent's messages, or change what paho's callbacks get.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt.bufsock import BufferedSocket

__all__ = ["WRITE_NOW_MAX", "PahoClient"]

#: Packets the daemon's loop writes itself at the end of a batch (``write_now``); more are
#: left to paho's network thread.
WRITE_NOW_MAX = 4

#: What a 2-byte PUBACK stands for (read-only: ``MqttClient._on_publish`` reads the value).
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_PUBACK_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
#: The properties of a PUBLISH that has none (read-only: ``MqttClient._on_message`` reads).
_PUBLISH_NO_PROPERTIES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


class PahoClient(paho.Client):
    """paho's client with the agent's changes (see the module docstring).

    It asks ``endpoint()`` where to go before every (re)connect: paho reconnects to the host
    and port given to ``connect_async``, and its public setters refuse a change while its
    state machine is between connections (exactly when a reconnect is due), so the choice
    is made here, the one place every attempt passes.
    """

    endpoint: Callable[[], tuple[str, int]] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: paho's network thread and :meth:`write_now` (the daemon's loop) both write.
        self._write_lock = threading.Lock()

    def _packet_write(self) -> MQTTErrorCode:
        with self._write_lock:
            return super()._packet_write()

    def write_now(self) -> bool:
        """From the daemon's loop: write what is queued now instead of waking paho's
        thread to do it; True when nothing is left for that thread. Only a few packets
        (one answer: the reply and the request's PUBACK), where the thread hop is the cost;
        a batch under load is left to paho's thread, off the loop. Only on a plain TCP
        connection: a TLS connection is read and written by paho's thread alone (OpenSSL
        takes no read and write of one connection from two threads at once). A failed
        write is left queued: paho's thread meets the same error and handles it."""
        raw = getattr(self._sock, "sock", None)
        if not isinstance(raw, socket.socket) or isinstance(raw, ssl.SSLSocket):
            return False
        if len(self._out_packet) > WRITE_NOW_MAX:  # under load: paho's thread writes them
            return False
        rc = self._packet_write()
        return rc == MQTTErrorCode.MQTT_ERR_SUCCESS and not self._out_packet

    def reconnect(self) -> MQTTErrorCode:
        if self.endpoint is not None:
            self._host, self._port = self.endpoint()
        return super().reconnect()

    def _create_socket(self) -> Any:
        """paho's socket (TCP or TLS, connected), read through a buffer (:mod:`.bufsock`)."""
        return BufferedSocket(super()._create_socket())

    def _handle_publish(self) -> MQTTErrorCode:
        """An MQTT 5 QoS 1 PUBLISH without properties (an invoke, a spec: nearly all we
        receive) is decoded here as paho does, without its per-packet properties object
        and debug formatting; anything else (properties, QoS 0 or 2, 3.1.1, a packet too
        short to be one) is paho's own, malformed ones included."""
        packet = self._in_packet["packet"]
        header = self._in_packet["command"]
        if self._protocol != paho.MQTTv5 or header & 0x06 != 0x02 or len(packet) < 5:
            return super()._handle_publish()
        at = 2 + ((packet[0] << 8) | packet[1])  # after the topic
        if at == 2 or len(packet) < at + 3 or packet[at + 2] != 0:  # alias, short, properties
            return super()._handle_publish()
        message = paho.MQTTMessage(
            mid=(packet[at] << 8) | packet[at + 1], topic=bytes(packet[2:at])
        )
        message.dup = bool(header & 0x08)
        message.qos = 1
        message.retain = bool(header & 0x01)
        message.properties = _PUBLISH_NO_PROPERTIES
        message.payload = bytes(packet[at + 3 :])
        message.timestamp = paho.time_func()
        self._handle_on_message(message)
        if self._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(message.mid)

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        """A 2-byte PUBACK (a success without properties: what a broker sends for every
        delivery, and every MQTT 3.1.1 PUBACK) means the same each time: paho's own decode
        built a reason code and a properties object for each. Anything else is paho's."""
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:  # as paho: only once per message
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _PUBACK_NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS
