"""Attacks on the agent's changes to paho (``agent.mqtt.paho_client``, ``agent.mqtt.bufsock``,
``agent.mqtt.wake``) from a hostile broker's side and a sceptical reviewer's.

- Byte level, against paho itself: the same stream of packets (plain and propertied
  PUBLISHes, QoS 0/1/2, dup/retain, empty payloads, PUBACKs with reason codes, properties,
  unknown and duplicate ids) is cut at every byte and fed to the agent's client (buffered
  socket, own decoders) and to paho's own client (raw socket): the callbacks get the same.
- A raw TCP "broker" written here (enough MQTT for CONNACK, PUBLISH, PUBACK, PINGRESP) drives
  a real :class:`~agent.mqtt.client.MqttClient` with its own network thread: packets that
  arrive together and then nothing more, packets dribbled a byte at a time, a 4-byte
  remaining length, EOF inside a buffered packet and the reconnect after it, manual acks,
  keepalive while the caller writes.
- Real mosquitto: a session redelivery (dup flag through the fast decoder), and TLS, where
  every write must stay on paho's thread.

Nothing sleeps to synchronise: every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt import MqttSettings
from agent.mqtt.bufsock import BufferedSocket
from agent.mqtt.client import MqttClient
from agent.mqtt.events import Connected, Disconnected, Message, MqttEvent, Published
from agent.mqtt.paho_client import PahoClient
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.ports import free_port
from testing.wait import wait_for

# -- MQTT 5 bytes, by hand ---------------------------------------------------------------------

CONNACK = b"\x20\x03\x00\x00\x00"  # MQTT 5: no session, success, no properties
PINGRESP = b"\xd0\x00"


def vbi(n: int) -> bytes:
    """MQTT's variable byte integer."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(header: int, body: bytes) -> bytes:
    return bytes([header]) + vbi(len(body)) + body


def props(**values: Any) -> bytes:
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(p, name, value)
    return bytes(p.pack())


def publish(
    topic: bytes,
    payload: bytes,
    *,
    qos: int = 1,
    mid: int = 1,
    properties: bytes = b"\x00",
    dup: bool = False,
    retain: bool = False,
) -> bytes:
    header = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    return packet(header, body + properties + payload)


def puback(mid: int, tail: bytes = b"") -> bytes:
    return packet(0x40, struct.pack("!H", mid) + tail)


def pubrel(mid: int) -> bytes:
    return packet(0x62, struct.pack("!H", mid))


def reason_string(text: str) -> bytes:
    p = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
    p.ReasonString = text
    return bytes(p.pack())


# -- 1. the same bytes, cut at every byte: ours against paho's own ---------------------------

#: The agent publishes three QoS 1 messages first (mids 1, 2, 3); the broker then sends:
STREAM = b"".join(
    [
        publish(b"edge/nodes/gw/invoke", b'{"request_id":"a"}', mid=11),  # the fast path
        publish(
            b"edge/nodes/gw/invoke",
            b'{"request_id":"b"}',
            mid=12,
            properties=props(
                ResponseTopic="cloud/answers",
                CorrelationData=b"\x00\x01corr",
                UserProperty=[("k", "v"), ("k2", "v2")],
            ),
        ),
        publish(b"edge/status/x", b"qos0", qos=0),
        publish(b"edge/nodes/gw/functions/f", b"", mid=13, dup=True, retain=True),  # empty
        puback(1),  # 2 bytes: the fast path
        publish(b"t/q2", b"exactly once", qos=2, mid=14),
        pubrel(14),
        puback(2, b"\x10"),  # no matching subscribers: still a delivery
        publish(b"t/\xc3\xa9", b"x" * 300, mid=15),  # 2-byte remaining length, UTF-8 topic
        puback(3, b"\x87" + reason_string("not authorised")),  # refused, with properties
        puback(999),  # unknown mid
        puback(1),  # duplicate
        puback(2, b"\x00\x00"),  # duplicate, reason and empty properties
        publish(b"t/last", b"last", mid=16, dup=True),
    ]
)


class Fed:
    """A client of one kind reading what a socket pair's far end sends, one packet per call
    of paho's own ``_packet_read`` (as its network thread does, without the select)."""

    def __init__(self, kind: type[paho.Client]) -> None:
        self.near, self.far = socket.socketpair()
        self.near.setblocking(False)
        client = kind(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="fed",
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        self.seen: list[Any] = []
        client.on_message = lambda _c, _u, m: self.seen.append(
            (
                "message",
                m.topic,
                bytes(m.payload),
                m.qos,
                m.retain,
                m.dup,
                m.mid,
                getattr(m.properties, "ResponseTopic", None),
                getattr(m.properties, "CorrelationData", None),
                getattr(m.properties, "UserProperty", None),
            )
        )
        client.on_publish = lambda _c, _u, mid, reason, p: self.seen.append(
            ("published", mid, reason.value, getattr(p, "ReasonString", None))
        )
        for n in range(3):  # not connected: kept, waiting for their PUBACKs (mids 1, 2, 3)
            client.publish(f"out/{n}", b"o", qos=1)
        client._sock = BufferedSocket(self.near) if kind is PahoClient else self.near
        self.client = client

    def feed(self, data: bytes) -> None:
        """Send ``data`` (from a thread: a big packet fills the pair's buffer) and read
        until everything sent is handled and nothing is left buffered."""
        sender = threading.Thread(target=self.far.sendall, args=(data,))
        if len(data) < 65536:  # fits the pair's buffer: no thread needed
            self.far.sendall(data)
        else:
            sender.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rc = self.client._packet_read()
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                if not sender.is_alive() and not select.select([self.near], [], [], 0)[0]:
                    break
                select.select([self.near], [], [], 0.05)  # more is coming: wait for it
                continue
            assert rc == MQTTErrorCode.MQTT_ERR_SUCCESS, rc
        if sender.ident is not None:
            sender.join(5)
        assert not sender.is_alive(), "the client did not read what was sent"
        self.far.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # the PUBREC paho answers: not ours to read
            while self.far.recv(65536):
                pass
        self.far.setblocking(True)

    def close(self) -> None:
        self.near.close()
        self.far.close()


def fed(kind: type[paho.Client], *pieces: bytes) -> list[Any]:
    f = Fed(kind)
    try:
        for piece in pieces:
            f.feed(piece)
        return f.seen
    finally:
        f.close()


def test_a_stream_cut_at_every_byte_reaches_the_callbacks_as_with_paho() -> None:
    whole = fed(paho.Client, STREAM)
    assert [e[0] for e in whole].count("message") == 7, whole
    published = [e for e in whole if e[0] == "published"]
    assert published == [
        ("published", 1, 0, None),
        ("published", 2, 0x10, None),
        ("published", 3, 0x87, "not authorised"),
    ], published
    assert fed(PahoClient, STREAM) == whole
    for cut in range(1, len(STREAM)):
        ours = fed(PahoClient, STREAM[:cut], STREAM[cut:])
        assert ours == whole, f"cut at byte {cut}: {ours} != {whole}"


def test_a_stream_dribbled_a_byte_at_a_time_reaches_the_callbacks_as_with_paho() -> None:
    pieces = [STREAM[i : i + 1] for i in range(len(STREAM))]
    assert fed(PahoClient, *pieces) == fed(paho.Client, STREAM)


def test_a_four_byte_remaining_length_cut_anywhere_in_its_header() -> None:
    """A PUBLISH of over 2 MiB (remaining length in 4 bytes), then a small one: cut inside
    the fixed header, inside the topic and inside the payload."""
    big = publish(b"t/big", bytes(range(256)) * 8200, mid=21)
    assert len(vbi(len(big) - 5 - 1)) == 4 and big[1:5] == vbi(len(big) - 5)
    stream = big + publish(b"t/small", b"s", mid=22)
    whole = fed(paho.Client, stream)
    assert [(e[1], len(e[2]), e[6]) for e in whole] == [
        ("t/big", 256 * 8200, 21),
        ("t/small", 1, 22),
    ]
    for cut in (1, 2, 3, 4, 5, 6, 9, 12, 70_000, len(big) - 1, len(big), len(big) + 1):
        assert fed(PahoClient, stream[:cut], stream[cut:]) == whole, cut


# -- 2. a broker of our own, a real client with its own network thread ---------------------


class Conn:
    """One client connection as the broker sees it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10)

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"client closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def read(self) -> tuple[int, bytes]:
        """The next packet from the client: (first byte, body)."""
        header = self._exact(1)[0]
        length, mult = 0, 1
        while True:
            byte = self._exact(1)[0]
            length += (byte & 0x7F) * mult
            mult *= 128
            if not byte & 0x80:
                break
        return header, self._exact(length)

    def read_until(self, kind: int, seen: list[int] | None = None) -> tuple[int, bytes]:
        """The next packet of this type (0x30 PUBLISH, 0x40 PUBACK, ...); others noted."""
        while True:
            header, body = self.read()
            if header & 0xF0 == kind:
                return header, body
            if seen is not None:
                seen.append(header)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


class FakeBroker:
    """Listens on a port of its own; :meth:`accept` the next client, CONNECT read."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.conns: list[Conn] = []

    def accept(self) -> Conn:
        sock, _ = self.listener.accept()
        conn = Conn(sock)
        self.conns.append(conn)
        header, _ = conn.read()
        assert header == 0x10, f"expected CONNECT, got {header:#x}"
        return conn

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()
        self.listener.close()


@contextlib.contextmanager
def client_of(
    fake: FakeBroker, keepalive: int = 60
) -> Iterator[tuple[MqttClient, list[MqttEvent]]]:
    events: list[MqttEvent] = []
    client = MqttClient(
        MqttSettings(
            host="127.0.0.1",
            port=fake.port,
            client_id="attacked",
            keepalive=keepalive,
            reconnect_min_s=0.05,
            reconnect_max_s=0.1,
        ),
        events.append,
        manual_ack=True,
    )
    client.start()
    try:
        yield client, events
    finally:
        client.stop(timeout=2)


@pytest.fixture
def fake() -> Iterator[FakeBroker]:
    broker = FakeBroker()
    yield broker
    broker.close()


def messages(events: list[MqttEvent]) -> list[Message]:
    return [e for e in list(events) if isinstance(e, Message)]


def test_packets_that_arrive_together_then_nothing_are_all_delivered_promptly(
    fake: FakeBroker,
) -> None:
    """CONNACK and five PUBLISHes in one segment, then silence (keepalive 60 s: nothing
    else wakes paho's thread): every one is read from the buffer without waiting in select
    for bytes that will never come."""
    with client_of(fake) as (_client, events):
        conn = fake.accept()
        burst = b"".join(publish(b"t/b", b"%d" % i, mid=100 + i) for i in range(5))
        started = time.monotonic()
        conn.send(CONNACK + burst)
        wait_for(
            lambda: len(messages(events)) == 5,
            3,
            "buffered packets were held back behind paho's select (a hang)",
            poll=0.001,
        )
        took = time.monotonic() - started
        assert [m.payload for m in messages(events)] == [b"%d" % i for i in range(5)]
        assert took < 0.9, f"delivered only after {took:.2f}s: paho's select timed out first"


def test_a_dribbled_stream_through_a_live_client(fake: FakeBroker) -> None:
    """The mixed packets one byte per send (TCP_NODELAY): the sink gets them whole, in
    order, QoS 0 and 2 and properties included, and the three PUBACKs once each."""
    with client_of(fake) as (client, events):
        conn = fake.accept()
        conn.send(CONNACK)
        client.wait_connected(5)
        mids = [client.publish(f"out/{n}", b"o") for n in range(3)]
        assert mids == [1, 2, 3], mids
        for _ in mids:
            conn.read_until(0x30)
        for i in range(len(STREAM)):
            conn.send(STREAM[i : i + 1])
        wait_for(lambda: len(messages(events)) == 7, 5, "not every dribbled PUBLISH arrived")
        got = messages(events)
        assert [(m.topic, m.qos, m.retain, m.dup, m.mid) for m in got] == [
            ("edge/nodes/gw/invoke", 1, False, False, 11),
            ("edge/nodes/gw/invoke", 1, False, False, 12),
            ("edge/status/x", 0, False, False, 0),
            ("edge/nodes/gw/functions/f", 1, True, True, 13),
            ("t/q2", 2, False, False, 14),
            ("t/é", 1, False, False, 15),
            ("t/last", 1, False, True, 16),
        ]
        assert got[1].response_topic == "cloud/answers"
        assert got[1].correlation_data == b"\x00\x01corr"
        assert got[0].response_topic is None and got[0].correlation_data is None
        assert got[3].payload == b"" and got[5].payload == b"x" * 300
        wait_for(lambda: len([e for e in events if isinstance(e, Published)]) >= 3, 5, "no PUBACKs")
        published = [(e.mid, e.reason_code) for e in list(events) if isinstance(e, Published)]
        assert published == [(1, 0), (2, 0x10), (3, 0x87)], published


def test_a_four_byte_remaining_length_and_a_small_packet_after_it(fake: FakeBroker) -> None:
    with client_of(fake) as (_client, events):
        conn = fake.accept()
        big = bytes(range(256)) * 8300  # > 2 MiB: remaining length in 4 bytes
        conn.send(CONNACK + publish(b"t/big", big, mid=5) + publish(b"t/s", b"after", mid=6))
        wait_for(lambda: len(messages(events)) == 2, 8, "the big or the small one is missing")
        assert [(m.topic, m.payload) for m in messages(events)] == [
            ("t/big", big),
            ("t/s", b"after"),
        ]


def test_eof_inside_a_buffered_packet_then_a_fresh_connection(fake: FakeBroker) -> None:
    """One segment holds a whole PUBLISH and the first half of another, then the broker
    closes: the first is delivered, the half never is, and the next connection's socket
    starts empty (no stale bytes glued to its first packet)."""
    with client_of(fake) as (client, events):
        conn = fake.accept()
        whole = publish(b"t/a", b"whole", mid=1)
        half = publish(b"t/cut", b"never" * 20, mid=2)
        conn.send(CONNACK + whole + half[: len(half) // 2])
        wait_for(lambda: messages(events), 5, "the whole packet before the cut was not delivered")
        first_socket = client._client.socket()  # type: ignore[union-attr]
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_for(
            lambda: any(isinstance(e, Disconnected) for e in list(events)),
            5,
            "EOF inside a packet was not a lost connection",
        )
        conn2 = fake.accept()
        conn2.send(CONNACK + publish(b"t/b", b"fresh", mid=1))
        wait_for(lambda: len(messages(events)) >= 2, 5, "nothing arrived on the new connection")
        got = [(m.topic, m.payload, m.connection) for m in messages(events)]
        assert got == [("t/a", b"whole", 1), ("t/b", b"fresh", 2)], got
        now = client._client.socket()  # type: ignore[union-attr]
        assert isinstance(now, BufferedSocket) and now is not first_socket


def test_a_protocol_error_with_bytes_still_buffered_leaves_none_for_the_next_socket(
    fake: FakeBroker,
) -> None:
    """A PUBLISH with QoS 3 (paho drops the connection) and a valid PUBLISH after it, in
    one segment: the valid one is still in the buffer when the socket goes. It must die
    with that socket: the next connection delivers only what its broker sends."""
    with client_of(fake) as (client, events):
        conn = fake.accept()
        bad = packet(0x36, struct.pack("!H", 3) + b"t/q" + b"\x00\x07\x00bad")
        conn.send(CONNACK + bad + publish(b"t/stale", b"stale", mid=8))
        wait_for(
            lambda: any(isinstance(e, Disconnected) for e in list(events)),
            5,
            "a PUBLISH with QoS 3 did not drop the connection",
        )
        conn2 = fake.accept()
        conn2.send(CONNACK + publish(b"t/fresh", b"fresh", mid=8))
        wait_for(lambda: messages(events), 5, "nothing arrived on the new connection")
        got = [(m.topic, m.payload, m.connection) for m in messages(events)]
        assert got == [("t/fresh", b"fresh", 2)], got
        assert client.connected


def test_manual_ack_goes_out_only_when_asked(fake: FakeBroker) -> None:
    """No PUBACK for a delivered QoS 1 PUBLISH (dup set: the fast decoder keeps the flag)
    until ``ack``; acked inside ``corked`` (written by the caller's thread or paho's,
    whichever is first), it is the next packet the broker reads, once."""
    with client_of(fake) as (client, events):
        conn = fake.accept()
        conn.send(CONNACK + publish(b"t/m", b"handle me", mid=4242, dup=True))
        wait_for(lambda: messages(events), 5, "the PUBLISH was not delivered")
        [msg] = messages(events)
        assert msg.dup is True and msg.mid == 4242
        # What was written so far reaches the broker in order: if paho had acked on its own,
        # that PUBACK would be read before this marker.
        marker = client.publish("marker", b"m", qos=0)
        header, body = conn.read()
        assert header & 0xF0 == 0x30 and b"marker" in body, (hex(header), body, marker)
        with client.corked():
            client.ack(msg)
        header, body = conn.read()
        assert header == 0x40 and body[:2] == struct.pack("!H", 4242), (hex(header), body)
        client.publish("marker2", b"m", qos=0)  # and only once: the marker is next
        header, body = conn.read()
        assert header & 0xF0 == 0x30 and b"marker2" in body, (hex(header), body)


def test_keepalive_pings_go_out_while_idle_and_between_the_callers_writes(
    fake: FakeBroker,
) -> None:
    """keepalive 2 s: the caller writes a few corked batches itself, then nothing: paho's
    thread still sends PINGREQ at least every keepalive, and the connection stays up."""
    with client_of(fake, keepalive=2) as (client, events):
        conn = fake.accept()
        conn.send(CONNACK)
        assert client.wait_connected(5)
        arrivals: list[tuple[float, int]] = []
        stop = threading.Event()

        def serve() -> None:
            with contextlib.suppress(OSError, EOFError):
                while not stop.is_set():
                    header, body = conn.read()
                    arrivals.append((time.monotonic(), header))
                    if header == 0xC0:
                        conn.send(PINGRESP)
                    elif header & 0xF0 == 0x30 and header & 0x06:
                        n = 2 + struct.unpack("!H", body[:2])[0]
                        conn.send(puback(struct.unpack("!H", body[n : n + 2])[0]))

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            started = time.monotonic()
            for n in range(5):
                with client.corked():
                    client.publish("t/k", b"%d" % n)
            wait_for(
                lambda: sum(1 for _, h in arrivals if h == 0xC0) >= 3,
                9,
                "fewer than 3 PINGREQs within 9 s at keepalive 2 s",
            )
            times = [started] + [t for t, _ in list(arrivals)]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert max(gaps) < 3.0, f"the broker heard nothing for {max(gaps):.1f}s: {gaps}"
            assert not any(isinstance(e, Disconnected) for e in list(events)), events
        finally:
            stop.set()


# -- 3. real mosquitto: session redelivery, TLS ----------------------------------------------


def test_a_redelivery_after_no_ack_carries_the_dup_flag(tmp_path: Path) -> None:
    """Manual ack withheld, the connection dropped: mosquitto sends the message again on
    the resumed session with DUP set, through the fast decoder (no properties), and the
    sink sees ``dup`` True on the copy only."""
    broker = Mosquitto(tmp_path).start()
    events: list[MqttEvent] = []
    client = MqttClient(
        MqttSettings(
            host="127.0.0.1", port=broker.port, client_id="redeliver", reconnect_max_s=0.2
        ),
        events.append,
        subscriptions=["edge/redo/#"],
        manual_ack=True,
    )
    cloud = None
    try:
        client.start()
        assert client.wait_connected(10)
        cloud = Cloud(broker.port)
        wait_for(lambda: client._subscribing == {}, 5, "no SUBACK")
        cloud.publish("edge/redo/x", b"do it once")
        wait_for(lambda: messages(events), 5, "the first delivery did not arrive")
        client.kill_network()
        wait_for(lambda: len(messages(events)) >= 2, 10, "no redelivery of the unacked message")
        first, again = messages(events)[:2]
        assert (first.payload, first.dup, first.connection) == (b"do it once", False, 1)
        assert (again.payload, again.dup, again.connection) == (b"do it once", True, 2), again
        assert again.response_topic is None
    finally:
        if cloud is not None:
            cloud.close()
        client.stop()
        broker.stop()


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Mosquitto, int, Path]]:
    """mosquitto with a plain listener (``port``, the test cloud) and a TLS one; the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    d = tmp_path / "pki"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=server",
            "-keyout", "server.key", "-out", "server.csr", cwd=d)  # fmt: skip
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", "server.crt", "-extfile", "server.ext",
            cwd=d)  # fmt: skip
    for f in d.iterdir():
        f.chmod(0o644)
    tls_port = free_port()
    extra = (
        f"listener {tls_port} 127.0.0.1\ncafile {d / 'ca.crt'}\n"
        f"certfile {d / 'server.crt'}\nkeyfile {d / 'server.key'}\n"
    )
    if os.geteuid() != 0:
        extra = "user " + os.environ.get("USER", "nobody") + "\n" + extra
    broker = Mosquitto(tmp_path, extra=extra).start()
    yield broker, tls_port, d / "ca.crt"
    broker.stop()


def corked_burst(
    client: MqttClient, cloud: Cloud, tag: str
) -> tuple[list[str], Callable[[], None]]:
    """A spy on the client's socket writes (which threads), and a burst of corked batches
    as the daemon's loop sends them (a reply, a PUBACK-sized message, a big one): every
    message reaches the cloud once, intact."""
    sock = client._client._sock  # type: ignore[union-attr]
    threads: list[str] = []
    inner_send = sock.sock.send

    def spy(data: Any, *args: Any) -> int:
        threads.append(threading.current_thread().name)
        return inner_send(data, *args)

    sock.send = spy

    def run() -> None:
        sent = []
        for n in range(60):
            with client.corked():
                for k in range(1 + n % 3):
                    payload = f"{tag}-{n}-{k}-".encode() + b"p" * (40_000 if k == 2 else n)
                    client.publish(f"edge/burst/{tag}", payload)
                    sent.append(payload)

        def got() -> list[bytes]:
            return [p for t, p, _ in list(cloud.messages) if t == f"edge/burst/{tag}"]

        wait_for(lambda: len(got()) >= len(sent), 15, f"not all {len(sent)} arrived")
        assert sorted(got()) == sorted(sent)

    return threads, run


def test_over_tls_every_write_stays_on_pahos_thread(
    tls_broker: tuple[Mosquitto, int, Path],
) -> None:
    broker, tls_port, ca = tls_broker
    events: list[MqttEvent] = []
    client = MqttClient(
        MqttSettings(
            host="127.0.0.1", port=tls_port, client_id="tls-burst", tls=True, ca_file=str(ca)
        ),
        events.append,
    )
    cloud = Cloud(broker.port)
    try:
        client.start()
        assert client.wait_connected(10), events
        threads, run = corked_burst(client, cloud, "tls")
        run()
        me = threading.current_thread().name
        assert threads and me not in threads, f"{threads.count(me)} TLS writes on {me}"
        assert all(isinstance(e, (Connected, Published)) for e in events), events
    finally:
        cloud.close()
        client.stop()


def test_on_plain_tcp_the_callers_thread_writes_its_small_batches(
    tls_broker: tuple[Mosquitto, int, Path],
) -> None:
    """The control of the TLS test: the same spy sees the caller write on plain TCP."""
    broker, _tls_port, _ca = tls_broker
    client = MqttClient(
        MqttSettings(host="127.0.0.1", port=broker.port, client_id="plain-burst"), lambda e: None
    )
    cloud = Cloud(broker.port)
    try:
        client.start()
        assert client.wait_connected(10)
        threads, run = corked_burst(client, cloud, "plain")
        run()
        assert threading.current_thread().name in threads, threads
    finally:
        cloud.close()
        client.stop()
