"""The client's own decoding of the two packets it receives most (``agent.mqtt.client``'s
``_RotatingClient``): an MQTT 5 QoS 1 PUBLISH without properties and a 2-byte PUBACK. Each
must give the callbacks exactly what paho's own decoding gives, and leave every other packet
(properties, QoS 0/2, 3.1.1, malformed) to paho. Packets are fed to both decoders directly."""

from __future__ import annotations

import random
import struct
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt.client import _RotatingClient

PUBLISH = 0x30


def _client(protocol: int = paho.MQTTv5, manual_ack: bool = True) -> tuple[Any, list[Any]]:
    client = _RotatingClient(
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
        client = _RotatingClient(
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
