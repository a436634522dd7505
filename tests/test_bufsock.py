"""paho's socket read through a buffer (``agent.mqtt.bufsock``): every byte in order, none
held back from paho's ``select`` (``pending``), the socket's own errors and EOF as they are.
Real socket pairs; a real paho client through a real broker."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.mqtt import MqttSettings
from agent.mqtt.bufsock import READ_SIZE, BufferedSocket
from agent.mqtt.client import MqttClient
from agent.mqtt.events import Connected, Message, MqttEvent
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.wait import wait_for


@pytest.fixture
def pair() -> Iterator[tuple[BufferedSocket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    with contextlib.closing(a), contextlib.closing(b):
        yield BufferedSocket(a), b


def test_small_reads_get_every_byte_in_order(pair: tuple[BufferedSocket, socket.socket]) -> None:
    """The way paho reads (1 byte, 1 byte, the rest), over data that came in one piece."""
    sock, peer = pair
    rng = random.Random(7)
    data = bytes(rng.randrange(256) for _ in range(5000))
    peer.sendall(data)
    got = bytearray()
    while len(got) < len(data):
        want = rng.choice([1, 1, 2, 100, 4096])
        chunk = sock.recv(want)
        assert 0 < len(chunk) <= want
        got += chunk
    assert bytes(got) == data
    assert sock.pending() == 0
    with pytest.raises(BlockingIOError):  # nothing buffered, nothing sent: the socket says so
        sock.recv(1)


def test_pending_counts_what_is_buffered(pair: tuple[BufferedSocket, socket.socket]) -> None:
    """paho skips its select while ``pending`` is above 0: buffered bytes never wait for
    more data to arrive."""
    sock, peer = pair
    peer.sendall(b"abcdef")
    assert sock.pending() == 0  # nothing read from the socket yet
    assert sock.recv(1) == b"a"
    assert sock.pending() == 5
    assert sock.recv(10) == b"bcdef"
    assert sock.pending() == 0


def test_a_large_read_is_not_cut_to_the_buffer_size(
    pair: tuple[BufferedSocket, socket.socket],
) -> None:
    sock, peer = pair
    data = b"x" * (3 * READ_SIZE)
    sender = threading.Thread(target=peer.sendall, args=(data,))
    sender.start()
    got = bytearray()

    def more() -> bool:
        with contextlib.suppress(BlockingIOError):
            got.extend(sock.recv(len(data) - len(got)))
        return len(got) == len(data)

    wait_for(more, 10, "the large message did not arrive whole")
    sender.join()
    assert bytes(got) == data


def test_eof_and_the_rest_reach_paho_as_they_are(
    pair: tuple[BufferedSocket, socket.socket],
) -> None:
    sock, peer = pair
    peer.sendall(b"last")
    peer.shutdown(socket.SHUT_WR)
    assert sock.recv(2) == b"la"
    assert sock.recv(2) == b"st"
    assert sock.recv(1) == b""  # EOF: paho calls it a lost connection
    assert sock.fileno() >= 0  # everything else is the socket's own


def test_an_agent_client_receives_a_burst_through_the_buffer(tmp_path: Path) -> None:
    """300 messages published at once (many packets per read) reach the sink whole, in
    order, and the client's socket is the buffered one."""
    with contextlib.ExitStack() as stack:
        broker = Mosquitto(tmp_path).start()
        stack.callback(broker.stop)
        events: list[MqttEvent] = []
        client = MqttClient(
            MqttSettings(host="127.0.0.1", port=broker.port, client_id="bufsock-test"),
            events.append,
            subscriptions=["bufsock/#"],
            manual_ack=False,
        )
        client.start()
        stack.callback(client.stop)
        wait_for(lambda: any(isinstance(e, Connected) for e in events), 10, "no CONNACK")
        assert isinstance(client._client.socket(), BufferedSocket)  # type: ignore[union-attr]
        cloud = Cloud(broker.port)
        stack.callback(cloud.close)
        payloads = [str(i).encode() * (1 + i % 50) for i in range(300)]
        for payload in payloads:  # not waiting for each: they arrive together
            cloud.client.publish("bufsock/t", payload, qos=1)

        def received() -> list[bytes]:
            return [e.payload for e in events if isinstance(e, Message)]

        wait_for(lambda: len(received()) >= len(payloads), 15, "not every message arrived")
        assert received() == payloads
