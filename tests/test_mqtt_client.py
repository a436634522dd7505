"""agent.mqtt.MqttClient against a real mosquitto: connect, subscribe, publish, manual acks,
the Last Will, reconnects, MQTT 3.1.1; and the reconnect backoff, the PUBACK watchdog's clock
and the "auto" version choice as pure code."""

from __future__ import annotations

import queue
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agent.mqtt import (
    Connected,
    Disconnected,
    Message,
    MqttClient,
    MqttError,
    MqttEvent,
    MqttSettings,
    Published,
    Will,
    backoff_delay,
)
from agent.mqtt.pubacks import PubackWatchdog
from agent.mqtt.version import VersionChoice, will_hint
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.wait import wait_for


class Events:
    """The client's sink: a queue, read with deadlines; unmatched events are kept, in order."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[MqttEvent] = queue.SimpleQueue()
        self.seen: list[MqttEvent] = []

    def __call__(self, event: MqttEvent) -> None:
        self.queue.put(event)

    def wait(
        self,
        kind: type[Any],
        predicate: Callable[[Any], bool] = lambda e: True,
        timeout: float = 10.0,
    ) -> Any:
        for event in self.seen:
            if isinstance(event, kind) and predicate(event):
                self.seen.remove(event)
                return event
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = self.queue.get(timeout=remaining)
            except queue.Empty:
                break
            if isinstance(event, kind) and predicate(event):
                return event
            self.seen.append(event)
        pytest.fail(f"no {kind.__name__} event within {timeout:g}s; saw {self.seen}")


ClientFactory = Callable[..., tuple[MqttClient, Events]]


@pytest.fixture
def make_client(broker: Mosquitto) -> Iterator[ClientFactory]:
    clients: list[MqttClient] = []

    def make(
        *,
        protocol: str = "5",
        will: Will | None = None,
        subscriptions: list[str] | None = None,
        **settings: Any,
    ) -> tuple[MqttClient, Events]:
        events = Events()
        base: dict[str, Any] = {
            "port": broker.port,
            "client_id": f"test-{uuid.uuid4().hex[:8]}",
            "keepalive": 5,
            "protocol": protocol,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
        }
        client = MqttClient(
            MqttSettings(**{**base, **settings}),
            events,
            will=will,
            subscriptions=subscriptions,
            rng=random.Random(7),
        )
        clients.append(client)
        return client, events

    yield make
    for client in clients:
        client.stop()


def started(client: MqttClient, events: Events) -> Connected:
    client.start()
    connected: Connected = events.wait(Connected)
    assert client.connected
    return connected


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_connects_subscribes_receives_and_publishes(
    make_client: ClientFactory, cloud: Cloud, protocol: str
) -> None:
    """Both protocol versions: subscriptions are made on connect, messages flow both ways."""
    cloud.publish("edge/t/retained", b"was here first", retain=True)
    client, events = make_client(protocol=protocol, subscriptions=["edge/t/#"])
    started(client, events)
    retained: Message = events.wait(Message, lambda m: m.topic == "edge/t/retained")
    assert retained.payload == b"was here first" and retained.retain and retained.qos == 1

    cloud.publish("edge/t/live", b"live")  # the subscription is known to be active now
    live: Message = events.wait(Message, lambda m: m.topic == "edge/t/live")
    assert live.payload == b"live" and not live.retain
    client.ack(live)
    client.ack(retained)

    mid = client.publish("edge/out/x", b"hello", qos=1, correlation_data=b"ignored in 3.1.1")
    events.wait(Published, lambda p: p.mid == mid)
    wait_payload(cloud, "edge/out/x", b"hello")


def wait_payload(cloud: Cloud, topic: str, payload: bytes) -> None:
    wait_for(
        lambda: any(t == topic and p == payload for t, p, _ in list(cloud.messages)),
        10,
        f"the cloud never received {payload!r} on {topic}",
    )


def test_tcp_nodelay_is_set_on_the_socket(make_client: ClientFactory) -> None:
    """TCP_NODELAY is on, so a QoS 1 round trip does not wait on Nagle + delayed ACK."""
    client, events = make_client()
    started(client, events)
    assert client._client is not None
    sock: Any = client._client.socket()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_construction_touches_nothing_and_publish_before_start_fails(
    make_client: ClientFactory,
) -> None:
    """Building a client opens no connection; publishing before start() is an MqttError."""
    client, events = make_client()
    assert client._client is None and not client.connected
    with pytest.raises(MqttError):
        client.publish("edge/x", b"x")
    assert events.queue.empty()


def test_unacknowledged_message_is_redelivered_and_acknowledged_one_is_not(
    make_client: ClientFactory, cloud: Cloud
) -> None:
    """Manual ack: a message not acked comes back after a reconnect; once acked it does not."""
    cloud.publish("edge/ack/ready", b"1", retain=True)  # its arrival: the subscription is live
    client, events = make_client(subscriptions=["edge/ack/#"])
    started(client, events)
    ready: Message = events.wait(Message, lambda m: m.topic == "edge/ack/ready")
    client.ack(ready)
    cloud.publish("edge/ack/cmd", b"do it")
    first: Message = events.wait(Message, lambda m: m.topic == "edge/ack/cmd")

    client.kill_network()  # no PUBACK was sent: the broker still owes us this message
    events.wait(Disconnected)
    session: Connected = events.wait(Connected)
    assert session.session_present
    again: Message = events.wait(Message, lambda m: m.topic == "edge/ack/cmd")
    assert again.payload == b"do it"
    client.ack(again)

    cloud.publish("edge/ack/after", b"marker")
    events.wait(Message, lambda m: m.topic == "edge/ack/after")  # PUBACK reached the broker
    client.kill_network()
    events.wait(Disconnected)
    events.wait(Connected)
    cloud.publish("edge/ack/after", b"marker 2")
    events.wait(Message, lambda m: m.payload == b"marker 2")
    redelivered = [e for e in events.seen if isinstance(e, Message) and e.topic == "edge/ack/cmd"]
    assert redelivered == [], f"acknowledged message came back: {redelivered}"
    assert first.payload == again.payload


def test_will_fires_on_dropped_connection_but_not_on_stop(
    make_client: ClientFactory, cloud: Cloud
) -> None:
    """The Last Will is published when the TCP connection dies, never after a clean stop()."""
    clean, clean_events = make_client(will=Will("edge/will/clean", b"gone", retain=False))
    started(clean, clean_events)
    clean.stop()
    assert not clean.connected

    dying, dying_events = make_client(will=Will("edge/will/dying", b"gone", retain=False))
    started(dying, dying_events)
    dying.kill_network()
    wait_payload(cloud, "edge/will/dying", b"gone")
    assert [t for t, _, _ in list(cloud.messages) if t == "edge/will/clean"] == []


def test_reconnects_and_resubscribes_after_broker_restart(
    make_client: ClientFactory, broker: Mosquitto
) -> None:
    """A broker restart (sessions lost) ends in a new connection with the subscriptions back."""
    client, events = make_client(subscriptions=["edge/r/#"])
    started(client, events)
    broker.restart()
    events.wait(Disconnected)
    events.wait(Connected, timeout=15)
    fresh = Cloud(broker.port)
    try:
        fresh.publish("edge/r/x", b"after restart", retain=True)
        message: Message = events.wait(Message, lambda m: m.topic == "edge/r/x")
        assert message.payload == b"after restart"
    finally:
        fresh.close()


def test_reconnect_waits_what_the_settings_say(make_client: ClientFactory) -> None:
    """With reconnect_max_s=0.2 a dropped connection is back well before a second."""
    client, events = make_client(reconnect_min_s=0.1, reconnect_max_s=0.2)
    started(client, events)
    client.kill_network()
    events.wait(Disconnected)
    dropped = time.monotonic()
    events.wait(Connected)
    took = time.monotonic() - dropped
    assert took < 0.9, f"reconnect took {took:.2f}s with reconnect_max_s=0.2"


# -- backoff_delay (pure) --------------------------------------------------------------------


@pytest.mark.parametrize(("low", "high"), [(0.5, 60.0), (0.1, 1.0), (2.0, 2.0)])
def test_backoff_delay_stays_within_full_jitter_bounds(low: float, high: float) -> None:
    """Every delay is within [low, min(high, low * 2**attempt)]."""
    rng = random.Random(1234)
    for attempt in range(0, 12):
        ceiling = min(high, low * 2**attempt)
        for _ in range(200):
            delay = backoff_delay(attempt, low, high, rng)
            assert low <= delay <= ceiling, (attempt, delay)


def test_backoff_delay_is_jittered_and_grows_with_attempts() -> None:
    """Draws differ (no lock-step reconnects) and later attempts may wait longer."""
    rng = random.Random(99)
    draws = [backoff_delay(5, 0.5, 60.0, rng) for _ in range(100)]
    assert len(set(draws)) > 90
    assert max(draws) > 8.0  # ceiling is 16 s at attempt 5
    assert [backoff_delay(0, 0.5, 60.0, rng) for _ in range(10)] == [0.5] * 10


def test_backoff_delay_is_reproducible_and_safe_for_huge_attempts() -> None:
    """The same seed gives the same delays; attempt 10_000 neither overflows nor exceeds high."""
    a = [backoff_delay(n, 0.5, 60.0, random.Random(5)) for n in range(20)]
    b = [backoff_delay(n, 0.5, 60.0, random.Random(5)) for n in range(20)]
    assert a == b
    assert 0.5 <= backoff_delay(10_000, 0.5, 60.0, random.Random(5)) <= 60.0


# -- PubackWatchdog (pure but for its thread) ------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_puback_watchdog_reports_the_oldest_wait_only_on_a_live_connection() -> None:
    clock = FakeClock()
    watchdog = PubackWatchdog(clock)
    assert watchdog.overdue(20.0, lambda: True) is None  # nothing sent
    watchdog.sent(1)
    clock.now += 5
    watchdog.sent(2)
    watchdog.sent(1)  # a resend of mid 1 keeps its first time
    clock.now += 16  # mid 1 has waited 21 s
    assert watchdog.overdue(20.0, lambda: False) is None  # not connected: nothing to drop
    assert watchdog.overdue(20.0, lambda: True) == 21.0
    # Every one starts afresh, one limit ahead: the next connection gets its full time.
    assert watchdog.overdue(20.0, lambda: True) is None
    clock.now += 40  # 20 s past the fresh start: not over the limit yet
    assert watchdog.overdue(20.0, lambda: True) is None
    clock.now += 1
    assert watchdog.overdue(20.0, lambda: True) == 21.0


def test_puback_watchdog_forgets_acked_and_restarts_on_a_new_connection() -> None:
    clock = FakeClock()
    watchdog = PubackWatchdog(clock)
    watchdog.sent(1)
    watchdog.sent(2)
    watchdog.done(1)
    watchdog.done(7)  # unknown: ignored
    clock.now += 15
    watchdog.restart()  # reconnected: paho resends mid 2, its clock starts again
    clock.now += 10
    assert watchdog.overdue(20.0, lambda: True) is None
    clock.now += 11
    assert watchdog.overdue(20.0, lambda: True) == 21.0
    watchdog.done(2)
    clock.now += 100
    assert watchdog.overdue(20.0, lambda: True) is None


def test_puback_watchdog_thread_calls_on_stale_until_stopped() -> None:
    clock = FakeClock()
    watchdog = PubackWatchdog(clock)
    stale: queue.SimpleQueue[float] = queue.SimpleQueue()
    watchdog.sent(1)
    clock.now += 30
    before = set(threading.enumerate())
    watchdog.start(20.0, lambda: True, stale.put)
    (thread,) = [t for t in threading.enumerate() if t not in before and t.name == "mqtt-puback"]
    assert thread.daemon
    try:
        assert stale.get(timeout=10) == 30.0, "the watchdog thread never reported"
    finally:
        watchdog.stop()
    deadline = time.monotonic() + 10
    while thread.is_alive():
        assert time.monotonic() < deadline, "the watchdog thread outlived stop()"
        time.sleep(0.05)


# -- VersionChoice (pure): protocol "auto" and the wording of refusals -------------------------


def test_version_refusal_by_connack_is_worded_and_asks_for_the_fall_back() -> None:
    choice = VersionChoice("auto")
    choice.socket_opened()
    choice.connack_received()
    why, version = choice.refused("b", 1883, 0x84, "Unsupported protocol version")
    assert why == "broker b:1883 does not accept MQTT 5 (CONNACK: Unsupported protocol version)"
    assert version
    assert choice.fall_back()
    assert (choice.active, choice.fell_back_on_close) == ("3.1.1", False)
    assert not choice.fall_back()  # on 3.1.1 already
    why, version = choice.refused("b", 1883, 0x87, "Not authorized")
    assert (why, version) == ("broker refused the connection at b:1883: Not authorized", False)


def test_closes_during_connect_fall_back_then_go_back_to_5() -> None:
    choice = VersionChoice("auto")
    choice.socket_opened()
    assert choice.closed("b", 1, "Unspecified error") == (
        "broker b:1 closed the connection during CONNECT (Unspecified error): "
        "it may not accept MQTT 5",
        None,
    )
    assert choice.closed("b", 1, "Unspecified error") == (
        "broker b:1 closed the connection during CONNECT 2 times in a row: "
        "it does not accept MQTT 5",
        "fall_back",
    )
    assert choice.fall_back(on_close=True)
    assert (choice.active, choice.closed_in_connect) == ("3.1.1", 0)
    why, switch = choice.closed("b", 1, "Unspecified error")
    assert why == "broker b:1 closed the connection during CONNECT (Unspecified error, MQTT 3.1.1)"
    assert switch is None
    why, switch = choice.closed("b", 1, "Unspecified error")
    assert why == (
        "broker b:1 closed the connection during CONNECT 2 times in a row "
        "(Unspecified error, MQTT 3.1.1)"
    )
    assert switch == "back_to_5"
    choice.back_to_5()
    assert (choice.active, choice.closed_in_connect, choice.fell_back_on_close) == ("5", 0, False)


def test_a_connack_resets_the_close_count_and_a_fixed_version_never_switches() -> None:
    choice = VersionChoice("auto")
    choice.closed("b", 1, "x")
    choice.connack_received()
    assert choice.closed("b", 1, "x")[1] is None  # not "in a row" any more
    fixed = VersionChoice("5")
    fixed.closed("b", 1, "x")
    assert fixed.closed("b", 1, "x")[1] == "fall_back"
    assert not fixed.fall_back(on_close=True)
    assert fixed.active == "5"
    assert VersionChoice("3.1.1").active == "3.1.1"


def test_will_hint_names_a_dotted_will_topic() -> None:
    assert will_hint("edge/nodes/gw-01/status") == ""
    assert will_hint("") == ""
    assert will_hint("edge.x/nodes/gw-01/status").startswith(
        "; the Last Will's topic 'edge.x/nodes/gw-01/status' has a '.' or a space"
    )


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_every_puback_frees_its_place_and_is_reported_once(
    make_client: ClientFactory, cloud: Cloud, protocol: str
) -> None:
    """200 QoS 1 publishes through a window of 5, to a topic the cloud subscribes to: the
    2-byte PUBACKs the broker sends for deliveries (decoded by ``PahoClient`` without
    paho's objects) report a success for every mid, once each, and free paho's in-flight
    window (or the rest would never go)."""
    client, events = make_client(protocol=protocol, max_inflight=5)
    started(client, events)
    mids = [client.publish(f"edge/out/{i}", b"x" * i, qos=1) for i in range(200)]
    acked: list[Published] = [events.wait(Published, lambda p: p.mid in mids) for _ in mids]
    assert sorted(p.mid for p in acked) == sorted(mids)  # each once
    assert {(p.reason_code, p.reason) for p in acked} == {(0, "Success")}
    wait_payload(cloud, "edge/out/199", b"x" * 199)
