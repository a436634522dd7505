"""MqttSettings.from_config / for_controller: the one place connection settings are decided."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import agent
from agent.cloud import ctl
from agent.config import parse_config
from agent.mqtt import MqttSettings, max_packet_size


def test_from_config_takes_every_mqtt_key() -> None:
    config = parse_config(
        {
            "node": {"id": "gw-01"},
            "mqtt": {
                "brokers": ["10.0.0.1:1884", "[::1]:1885"],
                "keepalive": 15,
                "protocol": "3.1.1",
                "username": "u",
                "reconnect_min_s": 1.0,
                "reconnect_max_s": 30.0,
                "session_expiry_s": 600,
                "connect_timeout_s": 7.0,
            },
        }
    )
    s = MqttSettings.from_config(config)
    assert s.brokers == (("10.0.0.1", 1884), ("::1", 1885))
    assert (s.client_id, s.keepalive, s.protocol, s.username) == (
        "edge-agent-gw-01",
        15,
        "3.1.1",
        "u",
    )
    assert (s.reconnect_min_s, s.reconnect_max_s) == (1.0, 30.0)
    assert (s.session_expiry_s, s.connect_timeout_s, s.clean_start) == (600, 7.0, False)
    want = max(config.agent.max_payload_bytes, config.agent.max_spec_bytes)
    assert s.max_packet_size == max_packet_size(want)


def test_from_config_without_a_broker_list_uses_host_and_port() -> None:
    config = parse_config({"node": {"id": "gw-01"}, "mqtt": {"host": "b", "port": 8883}})
    s = MqttSettings.from_config(config)
    assert (s.host, s.port, s.brokers) == ("b", 8883, ())


def test_controller_settings_differ_only_in_the_reconnect_cap() -> None:
    one_shot = MqttSettings.for_controller("h", 1, one_shot=True, timeout_s=30.0)
    long_running = MqttSettings.for_controller("h", 1, one_shot=False, timeout_s=3.0)
    for s in (one_shot, long_running):
        assert (s.clean_start, s.session_expiry_s, s.reconnect_min_s) == (True, 0, 0.2)
    assert (one_shot.reconnect_max_s, long_running.reconnect_max_s) == (2.0, 5.0)
    assert (one_shot.connect_timeout_s, long_running.connect_timeout_s) == (10.0, 3.0)


def test_edgectl_settings() -> None:
    args = ctl.build_parser().parse_args(["--broker", "a:1,b:2", "--connect-timeout", "4", "nodes"])
    s = ctl.settings_from(args)
    assert (s.host, s.port, s.brokers) == ("a", 1, (("a", 1), ("b", 2)))
    assert (s.reconnect_max_s, s.connect_timeout_s, s.clean_start) == (2.0, 4.0, True)
    single = ctl.settings_from(ctl.build_parser().parse_args(["--broker", "a:1", "nodes"]))
    assert (single.host, single.port, single.brokers) == ("a", 1, ())


def test_settings_and_events_load_without_paho() -> None:
    """Only agent.mqtt.client may need paho: the settings, the events, the PUBACK clock, the
    version choice, the package itself and the config load without it (a fresh interpreter,
    so nothing is imported already)."""
    code = (
        "import sys\n"
        "import agent.mqtt.settings, agent.mqtt.events, agent.mqtt.pubacks, agent.mqtt.version\n"
        "import agent.mqtt, agent.config\n"
        "from agent.mqtt import MqttSettings, Message, PROTOCOL_REFUSED, MqttError\n"
        "loaded = sorted(m for m in sys.modules if m == 'paho' or m.startswith('paho.'))\n"
        "assert not loaded, loaded\n"
        "assert 'agent.mqtt.client' not in sys.modules\n"
        "from agent.mqtt import MqttClient\n"
        "assert MqttClient.__module__ == 'agent.mqtt.client'\n"
        "assert 'paho.mqtt.client' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _paho_imports(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value]  # importlib.import_module("paho..."), __import__
        else:
            continue
        if any(name == "paho" or name.startswith("paho.") for name in names):
            lines.append(node.lineno)
    return lines


def test_only_the_client_imports_paho() -> None:
    """The connection (``client.py``) and paho's ``Client`` as the agent changes it
    (``paho_client.py``, used by ``client.py`` alone) are the only paho users."""
    root = Path(agent.__file__).parent
    allowed = {root / "mqtt" / "client.py", root / "mqtt" / "paho_client.py"}
    for path in allowed:
        assert _paho_imports(path), f"{path.name} no longer imports paho: update this test"
    found = {
        str(path.relative_to(root.parent)): lines
        for path in sorted(root.rglob("*.py"))
        if path not in allowed and (lines := _paho_imports(path))
    }
    assert found == {}, f"paho imported outside agent/mqtt/(paho_)client.py: {found}"
