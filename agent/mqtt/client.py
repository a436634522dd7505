"""The MQTT connection (:class:`MqttClient`): the only module in the project that imports paho.

paho-mqtt 2.x (callback API v2) runs its network thread (``loop_start``); every callback
only turns paho's objects into plain :class:`MqttEvent` values and hands them to ``sink``
(the daemon's queue). Nothing here decides anything about deployments or invocations.

- MQTT 5 by default (clean start off, session expiry), 3.1.1 selectable (clean session off):
  the broker keeps our subscriptions and queues QoS 1 commands while we are away.
- ``protocol = "auto"``: MQTT 5 first; when the broker refuses the version (CONNACK
  "unsupported protocol version") or closes the connection during CONNECT twice in a row
  (what 3.1.1-only brokers such as NATS or RabbitMQ 3.10 do), the next attempts use 3.1.1.
  The choice is logged at INFO, a refused CONNECT at WARNING with the broker's reason.
  :mod:`agent.mqtt.version` decides and words; this module switches paho's CONNECT fields.
- Maximum Packet Size (MQTT 5 CONNECT property, ``max_packet_size``): a broker that honours
  it never sends us a bigger packet, so an oversized spec or invocation is never buffered.
- Last Will: the retained ``offline`` status, published by the broker on abrupt death.
- Reconnect: full-jitter exponential backoff between ``reconnect_min_s`` and
  ``reconnect_max_s``, so a fleet does not reconnect in lock-step after a broker restart.
  paho's own backoff has no jitter; we set its delay before each wait through the public
  ``reconnect_delay_set``.
- Broker lists (``MqttSettings.brokers``, the nodes of a clustered broker): start at a random
  entry, move to the next one on every failed connect and every lost connection, same client
  id and session. The backoff grows per full pass over the list (a jittered short delay
  between entries), so a dead node costs one short wait, not the node's downtime.
- TCP_NODELAY on every socket: without it a QoS 1 round trip waits on Nagle + delayed ACK
  (about 44 ms on loopback instead of well under 1 ms).
- PUBACK watchdog (broker lists, :mod:`agent.mqtt.pubacks`): a QoS 1 publish left without
  its PUBACK for ``puback_timeout_s`` drops the connection, so paho sends it again.
- PUBACK reason codes (MQTT 5) travel with :class:`Published`: a code >= 0x80 means the
  broker refused the message (not authorised, quota, ...), which is not a delivery.
- One wake-up per loop batch (:meth:`MqttClient.corked`, :mod:`agent.mqtt.wake`): the
  daemon's publishes and acks of one batch of events wake paho's network thread once; on
  plain TCP the loop writes them itself and wakes it only for what the socket did not take.
- Buffered reads (:mod:`agent.mqtt.bufsock`): paho reads a packet a few bytes per system
  call; one read serves every packet that arrived together.
- Manual acknowledgements: an incoming QoS 1 message is acknowledged only when the daemon
  says it has handled it durably (see :meth:`MqttClient.ack`), so a crash before that makes
  the broker deliver it again.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import ConfigError, MqttError
from agent.mqtt.events import (
    Connected,
    ConnectFailed,
    Disconnected,
    Message,
    MqttEvent,
    Published,
)
from agent.mqtt.paho_client import PahoClient
from agent.mqtt.pubacks import PubackWatchdog
from agent.mqtt.settings import MqttSettings, Will, list_backoff_delay
from agent.mqtt.version import VersionChoice, will_hint
from agent.mqtt.wake import HeldWake

# Named for the package, as before the split: operators filter the journal on "agent.mqtt".
log = logging.getLogger("agent.mqtt")


class MqttClient:
    """One MQTT connection. Construction touches nothing; ``start()`` connects in background."""

    def __init__(
        self,
        settings: MqttSettings,
        sink: Callable[[MqttEvent], None],
        *,
        will: Will | None = None,
        subscriptions: list[str] | None = None,
        manual_ack: bool = True,
        rng: random.Random | None = None,
        subscription_qos: dict[str, int] | None = None,
    ) -> None:
        self.settings = settings
        self._sink = sink
        self._will = will
        self._subscriptions = list(subscriptions or [])
        #: QoS per topic filter when not 1 (a read-only view may take 0: on NATS each QoS 1
        #: subscription is a replicated JetStream consumer, slow to create).
        self._qos = dict(subscription_qos or {})
        #: SUBSCRIBE packet id -> its filters, until the SUBACK says which were granted.
        self._subscribing: dict[int, list[str]] = {}
        #: QoS 1 publishes not yet acknowledged, and when they left.
        self._pubacks = PubackWatchdog()
        self._manual_ack = manual_ack
        self._rng = rng or random.Random()
        self._client: paho.Client | None = None
        self._attempt = 0
        self._connected = threading.Event()
        self._connection = 0
        self._version = VersionChoice(settings.protocol)
        self._last_refusal = ""
        endpoints = settings.endpoints()
        #: Index into the broker list of the current (or next) connection attempt.
        self._broker = self._rng.randrange(len(endpoints)) if len(endpoints) > 1 else 0
        self._refused = False

    @property
    def active_protocol(self) -> str:
        """The version in use: "5" or "3.1.1" ("auto" starts with 5)."""
        return self._version.active

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def broker(self) -> tuple[str, int]:
        """The broker connected to now (or tried next)."""
        endpoints = self.settings.endpoints()
        return endpoints[self._broker % len(endpoints)]

    def _rotate(self) -> None:
        """Move to the next broker of the list (a no-op with one)."""
        self._broker = (self._broker + 1) % len(self.settings.endpoints())

    def start(self) -> None:
        """Connect in the background; reconnects forever until ``stop()``."""
        s = self.settings
        v5 = self.active_protocol == "5"
        client = PahoClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else s.clean_start,
            reconnect_on_failure=True,
            manual_ack=self._manual_ack,
        )
        client.connect_timeout = s.connect_timeout_s
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)  # unbounded in paho: our outbox bounds what we send
        if s.username:
            client.username_pw_set(s.username, self._password())
        if s.tls:
            self._configure_tls(client)
        if self._will is not None:
            client.will_set(
                self._will.topic, self._will.payload, qos=self._will.qos, retain=self._will.retain
            )
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.endpoint = lambda: self.broker
        self._set_next_delay(client)
        properties = self._connect_properties() if v5 else None
        host, port = self.broker
        log.info(
            "connecting to %s with MQTT %s%s",
            s.describe(),
            self.active_protocol,
            " (protocol auto)" if s.protocol == "auto" else "",
        )
        client.connect_async(
            host,
            port,
            keepalive=s.keepalive,
            clean_start=s.clean_start if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self._client = client
        client.loop_start()
        if len(s.endpoints()) > 1 and s.puback_timeout_s > 0:
            self._pubacks.start(s.puback_timeout_s, self._connected.is_set, self._puback_overdue)

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Publishes and acks made inside (from one thread: the daemon's loop) wake paho's
        network thread once, at the end, instead of once each (:mod:`agent.mqtt.wake`).
        Nothing else changes: each is queued to paho when it is called, in order."""
        client = self._client
        wake = getattr(client, "_sockpairW", None) if client is not None else None
        if client is None or wake is None:  # not started, or stopped
            yield
            return
        if not isinstance(wake, HeldWake):  # paho made a new pair (loop_start): wrap it
            wake = HeldWake(wake)
            try:
                client._sockpairW = wake  # type: ignore[assignment]
            except (AttributeError, TypeError):  # private API changed: no cork, no harm
                wake = None
        if wake is None:
            yield
            return
        wake.held = True
        try:
            yield
        finally:
            wake.release(getattr(client, "write_now", None))

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread."""
        client = self._client
        if client is None:
            return
        self._client = None
        self._pubacks.stop()
        client.disconnect()
        client.loop_stop()
        self._connected.clear()

    def kill_network(self) -> None:
        """Drop the TCP connection without DISCONNECT (tests: the broker fires the Will)."""
        client = self._client
        if client is not None:
            sock: Any = client.socket()
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)

    # -- outgoing ------------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
    ) -> int:
        """Hand a message to paho; its mid (``Published(mid)`` follows on the broker's ack).

        ``correlation_data`` and ``response_topic`` become MQTT 5 properties (ignored on 3.1.1).
        """
        client = self._client
        if client is None:
            raise MqttError("not started")
        properties = None
        if self.active_protocol == "5" and (correlation_data is not None or response_topic):
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation_data is not None:
                properties.CorrelationData = correlation_data
            if response_topic:
                properties.ResponseTopic = response_topic
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos > 0:
            self._pubacks.sent(int(info.mid))
        return int(info.mid)

    def ack(self, msg: Message) -> None:
        """Acknowledge an incoming message (manual-ack mode) once it is handled durably.

        Only on the connection that delivered it: after a reconnect its packet id may name
        a different, newer message, and the broker resends the old one by itself.
        """
        client = self._client
        if (
            client is not None
            and msg.qos > 0
            and self._manual_ack
            and msg.connection == self._connection
            and self.connected
        ):
            client.ack(msg.mid, msg.qos)

    def forget(self, mid: int) -> bool:
        """Drop an unacknowledged outgoing message, so no reconnect sends it again.

        For a message after which the broker closes the connection (a poison message, see
        ``agent.edge.outbox``). paho keeps no public handle on its resend queue; it recounts its
        in-flight window from that queue on every reconnect.
        """
        client = self._client
        if client is None:
            return False
        self._pubacks.done(mid)
        with client._out_message_mutex:
            return client._out_messages.pop(mid, None) is not None

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        self._subscriptions.extend(t for t in topics if t not in self._subscriptions)
        self._qos.update((t, qos) for t in topics)  # kept for the next reconnect too
        client = self._client
        if client is not None and self.connected:
            self._send_subscribe(client, list(topics))

    def unsubscribe(self, topics: list[str]) -> None:
        """Drop filters (now, if connected, and from every later reconnect)."""
        gone = [t for t in topics if t in self._subscriptions]
        self._subscriptions = [t for t in self._subscriptions if t not in gone]
        for t in gone:
            self._qos.pop(t, None)
        client = self._client
        if gone and client is not None and self.connected:
            client.unsubscribe(gone)

    # -- paho callbacks (network thread): convert and enqueue, nothing else -------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # TLS wrappers proxy setsockopt; unix sockets lack TCP options.
        self._version.socket_opened()
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._version.connack_received()
        if reason.is_failure:
            host, port = self.broker
            self._attempt += 1
            self._rotate()
            self._refused = True
            self._set_next_delay(client)
            code = int(getattr(reason, "value", 0) or 0)
            why, version_refused = self._version.refused(host, port, code, str(reason))
            self._connect_refused(why)
            if version_refused:
                self._fall_back(client, why)
            return
        if self._last_refusal or self.settings.protocol == "auto":
            host, port = self.broker
            log.info("connected to %s:%d with MQTT %s", host, port, self.active_protocol)
        self._last_refusal = ""
        self._refused = False
        self._attempt = 0
        self._connection += 1
        self._pubacks.restart()  # paho resends what is unacknowledged: the clock restarts
        self._set_next_delay(client)
        if self._subscriptions:
            self._send_subscribe(client, list(self._subscriptions))
        self._connected.set()
        self._sink(Connected(session_present=bool(getattr(flags, "session_present", False))))

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        host, port = self.broker
        self._attempt += 1
        self._rotate()
        self._set_next_delay(client)
        self._sink(ConnectFailed(f"cannot reach {host}:{port}"))

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        host, port = self.broker
        self._attempt += 1
        refused, self._refused = self._refused, False
        if not refused:  # a refusing CONNACK moved on already (_on_connect)
            self._rotate()
        self._set_next_delay(client)
        if not self._version.connack:  # closed during CONNECT: no CONNACK at all
            why, switch = self._version.closed(host, port, str(reason))
            will_topic = self._will.topic if self._will is not None else ""
            self._connect_refused(why + will_hint(will_topic))
            if switch == "back_to_5":
                self._back_to_5(client)
            elif switch == "fall_back":
                self._fall_back(client, why, on_close=True)
        elif refused or not was_connected:
            pass  # the close after a refusing CONNACK: reported with the broker's reason
        else:
            self._sink(Disconnected(f"{reason} ({host}:{port})"))

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        response_topic = correlation = None
        props = getattr(msg, "properties", None)
        if props is not None:
            response_topic = getattr(props, "ResponseTopic", None)
            correlation = getattr(props, "CorrelationData", None)
        self._sink(
            Message(
                topic=msg.topic,
                payload=bytes(msg.payload),
                qos=msg.qos,
                retain=bool(msg.retain),
                mid=msg.mid,
                response_topic=response_topic,
                correlation_data=correlation,
                connection=self._connection,
                dup=bool(getattr(msg, "dup", False)),
            )
        )

    def _send_subscribe(self, client: paho.Client, topics: list[str]) -> None:
        _, mid = client.subscribe([(t, self._qos.get(t, 1)) for t in topics])
        if mid is not None:
            self._subscribing[mid] = topics

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        """A filter the broker refused (SUBACK 0x80: a NATS cluster that cannot create the
        JetStream consumer of a QoS 1 subscription while it elects leaders) is asked for
        again 1 s later, on the same connection; without this it stayed silently missing."""
        topics = self._subscribing.pop(mid, [])
        failed = [t for t, code in zip(topics, reason_codes, strict=False) if code.is_failure]
        if not failed:
            return
        log.warning("the broker refused the subscriptions %s; asking again in 1 s", failed)
        connection = self._connection

        def again() -> None:
            current = self._client
            if current is not None and self.connected and self._connection == connection:
                self._send_subscribe(current, failed)

        timer = threading.Timer(1.0, again)
        timer.daemon = True
        timer.start()

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        code = int(getattr(reason, "value", 0) or 0)
        self._pubacks.done(mid)
        self._sink(Published(mid, code, str(reason) if code else "Success"))

    def _puback_overdue(self, waited: float) -> None:
        """Watchdog thread (broker lists only, :mod:`agent.mqtt.pubacks`): a QoS 1 publish
        has waited ``puback_timeout_s`` for its PUBACK on a live connection: drop it, so the
        unacknowledged publishes go again on the next one, to the next node."""
        host, port = self.broker
        log.warning(
            "no PUBACK from %s:%d for %.0fs: dropping the connection so the "
            "unacknowledged messages go again",
            host,
            port,
            waited,
        )
        self.kill_network()

    # -- helpers ----------------------------------------------------------------------------

    def _connect_properties(self) -> Properties:
        s = self.settings
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = s.session_expiry_s
        if s.max_packet_size > 0:
            properties.MaximumPacketSize = s.max_packet_size
        return properties

    def _connect_refused(self, why: str) -> None:
        """Report a failed CONNECT: WARNING when the reason changes, DEBUG for repeats."""
        if why != self._last_refusal:
            log.warning("%s", why)
        else:
            log.debug("%s", why)
        self._last_refusal = why
        self._sink(ConnectFailed(why))

    def _fall_back(self, client: paho.Client, why: str, *, on_close: bool = False) -> None:
        """Network thread: with ``protocol = "auto"``, make the next attempt MQTT 3.1.1.

        paho reconnects with the same client object; its protocol is a plain attribute
        (paho itself downgrades 3.1.1 to 3.1 that way), so we switch it and the CONNECT
        fields that differ: 3.1.1 has clean session instead of clean start and no
        properties.
        """
        if not self._version.fall_back(on_close=on_close):
            return
        client._protocol = paho.MQTTv311
        client._clean_session = self.settings.clean_start
        client._connect_properties = None
        log.info("%s; protocol auto: using MQTT 3.1.1 from now on", why)

    def _back_to_5(self, client: paho.Client) -> None:
        """A fall-back made on closed connections alone, and 3.1.1 is closed on as well: the
        closes were not about the version (a proxy whose broker is down), so try 5 again."""
        self._version.back_to_5()
        client._protocol = paho.MQTTv5
        client._connect_properties = self._connect_properties()
        log.info(
            "MQTT 3.1.1 is closed during CONNECT too: not a version refusal; protocol auto: "
            "back to MQTT 5"
        )

    def _set_next_delay(self, client: paho.Client) -> None:
        s = self.settings
        delay = list_backoff_delay(
            self._attempt,
            len(s.endpoints()),
            s.reconnect_min_s,
            s.reconnect_max_s,
            self._rng,
        )
        # paho's annotations say int, but it only does arithmetic with them: sub-second works.
        client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]

    def _password(self) -> str | None:
        if self.settings.password:
            return self.settings.password
        if not self.settings.password_file:
            return None
        try:
            return Path(self.settings.password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"mqtt.password_file: cannot read: {exc}") from exc

    def _configure_tls(self, client: paho.Client) -> None:
        s = self.settings
        try:
            client.tls_set(
                ca_certs=s.ca_file or None,
                certfile=s.cert_file or None,
                keyfile=s.key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"mqtt.tls: cannot load certificates: {exc}") from exc
        if s.tls_insecure:
            client.tls_insecure_set(True)
