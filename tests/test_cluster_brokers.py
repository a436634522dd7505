"""Issue 13: broker lists in the MQTT client (``MqttSettings.brokers``, ``[mqtt] brokers``):
a random start, the next entry on a failed connect or a lost connection, the same client id,
jittered backoff per pass over the list."""

from __future__ import annotations

import queue
import random
import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, parse_config
from agent.mqtt import Connected, MqttClient, MqttEvent, MqttSettings, list_backoff_delay
from testing.broker import Mosquitto
from testing.ports import free_port
from testing.wait import wait_for


def test_backoff_over_a_list_grows_per_pass_and_is_jittered() -> None:
    rng = random.Random(1)
    first_pass = [list_backoff_delay(a, 3, 0.5, 60.0, rng) for a in range(3)]
    assert all(0.5 <= d <= 1.0 for d in first_pass)
    assert len(set(first_pass)) == 3  # jittered, not lock-step
    assert all(0.5 <= list_backoff_delay(30, 3, 0.5, 60.0, rng) <= 60.0 for _ in range(50))
    assert list_backoff_delay(0, 1, 0.5, 60.0, rng) == 0.5  # one broker: as before


def test_config_validates_broker_entries() -> None:
    base = '[node]\nid = "n1"\n[agent]\nstate_dir = "/tmp/x"\n[mqtt]\n'

    def parse_config_text(text: str) -> Any:
        return parse_config(tomllib.loads(text))

    cfg = parse_config_text(base + 'brokers = ["a:1883", "[::1]:1884", "b"]\n')
    assert cfg.mqtt.endpoints() == (("a", 1883), ("::1", 1884), ("b", 1883))
    for bad, says in (
        ('["a:0"]', "port from 1 to 65535"),
        ('["a:1883", "a:1883"]', "duplicate entry"),
        ('["::1:1883"]', "brackets"),
        ("[1883]", 'expected a "host:port" string'),
    ):
        with pytest.raises(ConfigError, match=r"mqtt\.brokers") as info:
            parse_config_text(base + f"brokers = {bad}\n")
        assert says in str(info.value)


def test_client_moves_to_the_next_broker_when_its_broker_dies(tmp_path: Path) -> None:
    """With one host:port the agent was down for its broker's whole downtime."""
    a = Mosquitto(tmp_path).start()
    b = Mosquitto(tmp_path).start()
    dead = free_port()
    events: queue.SimpleQueue[MqttEvent] = queue.SimpleQueue()
    settings = MqttSettings(
        client_id="list-client",
        brokers=(("127.0.0.1", dead), ("127.0.0.1", a.port), ("127.0.0.1", b.port)),
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        keepalive=5,
    )
    client = MqttClient(settings, events.put, subscriptions=["t/#"])
    try:
        client.start()
        assert client.wait_connected(10), "never connected past the dead entry"
        first = client.broker
        assert first[1] in (a.port, b.port)
        (a if first[1] == a.port else b).stop()
        wait_for(
            lambda: client.connected and client.broker != first,
            10,
            f"did not move on from {first} when it died",
        )
        connects = []
        while not events.empty():
            event = events.get()
            if isinstance(event, Connected):
                connects.append(event)
        assert len(connects) >= 2
    finally:
        client.stop()
        a.stop()
        b.stop()
