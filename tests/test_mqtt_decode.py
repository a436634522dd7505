"""The client's own work on paho's hot path (``agent.mqtt.paho_client.PahoClient``),
against paho's own:

- the decoding of the two packets it receives most, an MQTT 5 QoS 1 PUBLISH without
  properties and a 2-byte PUBACK: the callbacks get exactly what paho's decoding gives, and
  every other packet (properties, QoS 0/2, 3.1.1, malformed) is left to paho; packets are
  fed to both decoders directly;
- ``write_now``: the daemon's loop writes a small batch itself on plain TCP, in order, and
  never at the same time as paho's thread (a real broker takes every message intact).
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt import MqttSettings
from agent.mqtt.bufsock import BufferedSocket
from agent.mqtt.client import MqttClient
from agent.mqtt.events import Connected, Published
from agent.mqtt.paho_client import WRITE_NOW_MAX, PahoClient
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.wait import wait_for

PUBLISH = 0x30


def _client(protocol: int = paho.MQTTv5, manual_ack: bool = True) -> tuple[Any, list[Any]]:
    client = PahoClient(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="decode-test",
        protocol=protocol,
        manual_ack=manual_ack,
    )
    seen: list[Any] = []

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        seen.append(
            (
                msg.topic,
                bytes(msg.payload),
                msg.qos,
                msg.retain,
                msg.dup,
                msg.mid,
                getattr(props, "ResponseTopic", None),
                getattr(props, "CorrelationData", None),
                type(props).__name__,
            )
        )

    client.on_message = on_message
    return client, seen


def _outcome(client: Any, seen: list[Any], decode: Any, header: int, packet: bytes) -> Any:
    client._in_packet["command"] = header
    client._in_packet["packet"] = bytearray(packet)
    seen.clear()
    try:
        rc = decode()
    except Exception as exc:  # paho raises MalformedPacket (and the like) on bad packets
        return ("raised", type(exc).__name__, list(seen))
    return ("rc", rc, list(seen))


def both(header: int, packet: bytes, protocol: int = paho.MQTTv5, **kw: Any) -> tuple[Any, Any]:
    """(ours, paho's) for one packet, each on a client of its own."""
    ours, seen = _client(protocol, **kw)
    theirs, theirs_seen = _client(protocol, **kw)
    return (
        _outcome(ours, seen, ours._handle_publish, header, packet),
        _outcome(theirs, theirs_seen, lambda: paho.Client._handle_publish(theirs), header, packet),
    )


def publish(topic: bytes, mid: int, payload: bytes, props: bytes | None = b"\x00") -> bytes:
    out = struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid)
    return out + (props or b"") + payload


def test_a_plain_qos1_publish_is_decoded_as_paho_does() -> None:
    for flags in (0, 0x01, 0x08, 0x09):  # retain, dup
        header = PUBLISH | 0x02 | flags
        packet = publish(b"edge/nodes/gw/invoke", 4242, b'{"request_id":"r","payload":1}')
        ours, theirs = both(header, packet)
        assert ours == theirs and ours[0] == "rc" and len(ours[2]) == 1, (ours, theirs)


def test_everything_else_is_left_to_paho_with_the_same_outcome() -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = "cloud/answers"
    props.CorrelationData = b"\x01\x02"
    cases = [
        (PUBLISH | 0x02, publish(b"t/x", 7, b"p", props.pack())),  # properties
        (PUBLISH, struct.pack("!H", 3) + b"t/x" + b"\x00" + b"qos0"),  # QoS 0
        (PUBLISH | 0x04, publish(b"t/x", 9, b"qos2")),  # QoS 2
        (PUBLISH | 0x02, publish(b"", 9, b"alias")),  # empty topic (an alias)
        (PUBLISH | 0x02, publish(b"t/x", 9, b"")),  # empty payload: ours
        (PUBLISH | 0x02, b"\x00\x09t/"),  # topic longer than the packet
        (PUBLISH | 0x02, b"\x00"),  # too short
        (PUBLISH | 0x02, publish(b"t/\xff\xfe", 3, b"bad utf-8 topic")),
    ]
    for header, packet in cases:
        ours, theirs = both(header, packet)
        assert ours == theirs, (packet, ours, theirs)
    ours, theirs = both(PUBLISH | 0x02, publish(b"t/x", 5, b"v311", None), paho.MQTTv311)
    assert ours == theirs and ours[0] == "rc", (ours, theirs)


def test_automatic_acks_are_queued_as_paho_queues_them() -> None:
    packet = publish(b"t/auto", 77, b"x")
    ours, theirs = both(PUBLISH | 0x02, packet, manual_ack=False)
    assert ours == theirs, (ours, theirs)


def test_random_packets_decode_the_same_either_way() -> None:
    """Fuzz: random topics, ids, payloads and flags, well-formed or cut short."""
    rng = random.Random(15)
    for _ in range(2000):
        topic = bytes(rng.randrange(256) for _ in range(rng.randint(0, 12)))
        payload = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        props = rng.choice([b"\x00", b"\x00", b"\x00", b"\x02\x01\x01", b""])
        packet = publish(topic, rng.randrange(65536), payload, props)
        if rng.random() < 0.2:
            packet = packet[: rng.randrange(len(packet) + 1)]
        header = PUBLISH | rng.choice([0, 2, 2, 2, 4]) | rng.choice([0, 1, 8, 9])
        ours, theirs = both(header, packet)
        assert ours == theirs, (header, packet, ours, theirs)


@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311])
def test_a_two_byte_puback_reports_what_paho_reports(protocol: int) -> None:
    reports: dict[str, list[Any]] = {}
    for name in ("ours", "paho"):
        client = PahoClient(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="d", protocol=protocol
        )
        got: list[Any] = []
        client.on_publish = lambda _c, _u, mid, reason, props, got=got: got.append(
            (mid, reason.value, reason.getName(), type(props).__name__)
        )
        info = client.publish("t/x", b"x", qos=1)  # not connected: kept to send later
        client._in_packet["command"] = 0x40
        client._in_packet["packet"] = bytearray(struct.pack("!H", info.mid))
        if name == "ours":
            client._handle_pubackcomp("PUBACK")
            client._handle_pubackcomp("PUBACK")  # again: reported once, as paho does
        else:
            paho.Client._handle_pubackcomp(client, "PUBACK")
            paho.Client._handle_pubackcomp(client, "PUBACK")
        assert info.mid not in client._out_messages  # its place is free
        reports[name] = got
    assert reports["ours"] == reports["paho"] and len(reports["ours"]) == 1, reports


# -- the loop writes a small batch itself (write_now) -------------------------------------


def _queued_client(sock: Any, packets: list[bytes]) -> Any:
    client = PahoClient(callback_api_version=CallbackAPIVersion.VERSION2, client_id="w")
    client._sock = sock
    for packet in packets:
        client._out_packet.append(
            {"command": 0x40, "mid": 1, "qos": 1, "pos": 0, "to_process": len(packet),
             "packet": packet, "info": None}
        )  # fmt: skip
    return client


def test_write_now_writes_a_small_batch_on_plain_tcp_in_order() -> None:
    left, right = socket.socketpair()
    with contextlib.closing(left), contextlib.closing(right):
        left.setblocking(False)
        client = _queued_client(BufferedSocket(left), [b"\x40\x02\x00\x01", b"\x40\x02\x00\x02"])
        assert client.write_now() is True
        assert right.recv(100) == b"\x40\x02\x00\x01\x40\x02\x00\x02"
        assert not client._out_packet


def test_write_now_leaves_big_batches_and_tls_to_pahos_thread() -> None:
    left, right = socket.socketpair()
    with contextlib.closing(left), contextlib.closing(right):
        left.setblocking(False)
        many = [bytes([0x40, 2, 0, i]) for i in range(WRITE_NOW_MAX + 1)]
        client = _queued_client(BufferedSocket(left), many)
        assert client.write_now() is False and len(client._out_packet) == len(many)
        tls = ssl.create_default_context().wrap_socket(
            socket.socket(), server_hostname="x", do_handshake_on_connect=False
        )
        with contextlib.closing(tls):
            client = _queued_client(BufferedSocket(tls), many[:1])
            assert client.write_now() is False and len(client._out_packet) == 1


def test_write_now_keeps_what_the_socket_did_not_take_in_order() -> None:
    """A full socket buffer: what is left stays queued, the partial packet first, and the
    answer says paho's thread has work (it selects for writability)."""
    left, right = socket.socketpair()
    with contextlib.closing(left), contextlib.closing(right):
        left.setblocking(False)
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = [bytes([i]) * 400_000 for i in (1, 2)]
        client = _queued_client(BufferedSocket(left), big)
        assert client.write_now() is False
        assert client._out_packet and client._out_packet[0]["packet"] == big[0]
        got = bytearray()
        while client._out_packet or len(got) < 800_000:
            with contextlib.suppress(BlockingIOError):
                got += right.recv(1 << 20)
            client._packet_write()
        assert bytes(got) == big[0] + big[1]


def test_the_loop_and_pahos_thread_never_interleave_their_writes(tmp_path: Path) -> None:
    """A stress check on a real broker: one thread publishes in corked batches of 1-6 (some
    written by it, some by paho's thread), another uncorked (paho's thread writes those),
    big messages among them: the broker takes every message, intact, once. (The lock itself
    is pinned by ``test_write_now_waits_while_pahos_thread_writes``.)"""
    with contextlib.ExitStack() as stack:
        broker = Mosquitto(tmp_path).start()
        stack.callback(broker.stop)
        cloud = Cloud(broker.port)
        stack.callback(cloud.close)
        events: list[Any] = []
        client = MqttClient(
            MqttSettings(host="127.0.0.1", port=broker.port, client_id="interleave"),
            events.append,
        )
        client.start()
        stack.callback(client.stop)
        assert client.wait_connected(10)
        sent: list[bytes] = []
        lock = threading.Lock()

        def corked(tag: str) -> None:
            rng = random.Random(tag)
            for n in range(60):
                with client.corked():
                    for k in range(rng.randint(1, 6)):
                        size = rng.choice([0, 100, 3000, 300_000])  # big ones fill the socket
                        payload = f"{tag}-{n}-{k}-".encode() + b"p" * size
                        client.publish(f"edge/w/{tag}", payload)
                        with lock:
                            sent.append(payload)

        def plain(tag: str) -> None:
            for n in range(120):
                payload = f"{tag}-{n}-".encode() + b"q" * (n % 7) * 40_000
                client.publish(f"edge/w/{tag}", payload)
                with lock:
                    sent.append(payload)

        threads = [
            threading.Thread(target=corked, args=("c",)),
            threading.Thread(target=plain, args=("u",)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        def received() -> list[bytes]:
            return [p for topic, p, _ in list(cloud.messages) if topic.startswith("edge/w/")]

        wait_for(lambda: len(received()) >= len(sent), 30, f"not all {len(sent)} arrived")
        assert sorted(received()) == sorted(sent)
        assert all(isinstance(e, Connected) for e in events if not isinstance(e, Published))


def test_write_now_waits_while_pahos_thread_writes() -> None:
    """paho's thread holds the client's write lock (inside its own ``_packet_write``): the
    loop's ``write_now`` writes nothing until it is released, then everything, in order."""
    left, right = socket.socketpair()
    with contextlib.closing(left), contextlib.closing(right):
        left.setblocking(False)
        right.setblocking(False)
        client = _queued_client(BufferedSocket(left), [b"\x40\x02\x00\x07"])
        done: list[bool] = []
        client._write_lock.acquire()
        writer = threading.Thread(target=lambda: done.append(client.write_now()))
        writer.start()
        deadline = time.monotonic() + 0.5  # a missing lock writes within microseconds
        while time.monotonic() < deadline:
            with pytest.raises(BlockingIOError):
                right.recv(100)
        client._write_lock.release()
        writer.join(10)
        assert done == [True]
        assert right.recv(100) == b"\x40\x02\x00\x07"
