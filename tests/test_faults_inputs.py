"""Inputs too big for the gateway: specs and invocations of hundreds of MB.

Before issue 12 a refused 100 MB retained spec took the agent's peak RSS to 861 MB (200 MB:
1.8 GB, again on every reconnect), and invokes of 50 and 200 MB peaked at 189 and 647 MB
before their ``bad_request``. Now the agent announces an MQTT 5 Maximum Packet Size, so the
broker does not send them at all, and a spec is size-checked before it is parsed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.conftest import AgentProcess, Cloud, source_spec

ECHO = "def handler(payload):\n    return {'echo': payload}\n"
MB = 1024 * 1024


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _publish_big(cloud: Cloud, topic: str, payload: bytes, *, retain: bool = False) -> None:
    info = cloud.client.publish(topic, payload, qos=1, retain=retain)
    info.wait_for_publish(120)
    assert info.is_published(), f"the broker did not take the {len(payload)}-byte message"


def _big_spec(size: int) -> bytes:
    head = b'{"id": "big", "name": "big", "version": "1", "entrypoint": "m:handler", '
    tail = b'", "sha256": "' + b"0" * 64 + b'"}, "memory_mb": 64, "timeout_seconds": 5}'
    filler = size - len(head) - len(tail) - len(b'"code": {"format": "source", "data": "')
    return head + b'"code": {"format": "source", "data": "' + b"x" * filler + tail


def _ready_agent(agent_factory: Callable[..., AgentProcess], cloud: Cloud) -> AgentProcess:
    agent = agent_factory(agent={"log_level": "info"}).start()
    cloud.wait_message("edge/nodes/gw-test/status", lambda m: m["status"] == "online", 20)
    cloud.deploy(None, source_spec("echo", ECHO))
    cloud.wait_message(
        "edge/nodes/gw-test/functions/echo/state", lambda m: m["state"] == "active", 30
    )
    assert cloud.invoke("gw-test", "echo", 1, timeout=20)["ok"]
    return agent


def test_refused_200mb_spec_and_invoke_leave_the_agent_rss_flat(
    agent_factory: Callable[..., AgentProcess], cloud: Cloud
) -> None:
    """A 200 MB spec took the agent to 1.8 GB, a 200 MB invoke to 647 MB, to refuse them."""
    agent = _ready_agent(agent_factory, cloud)
    assert agent.proc is not None
    pid = agent.proc.pid
    idle_kb = _status_kb(pid, "VmRSS")
    _publish_big(cloud, "edge/fleet/functions/big", _big_spec(200 * MB), retain=True)
    body = json.dumps({"request_id": "huge", "function_id": "echo", "payload": ""}).encode()
    _publish_big(cloud, "edge/nodes/gw-test/invoke", body[:-2] + b"x" * (200 * MB) + b'"}')
    # Both were published before this one, on the same session: once it is answered, the
    # broker has dealt with them (dropped them for the agent: over its Maximum Packet Size).
    assert cloud.invoke("gw-test", "echo", "after", timeout=60)["ok"]
    agent_rss = _status_kb(pid, "VmHWM")
    print(
        f"\nagent idle RSS {idle_kb / 1024:.1f} MiB, peak (VmHWM) after a 200 MB spec "
        f"and a 200 MB invoke {agent_rss / 1024:.1f} MiB"
    )
    assert agent_rss < 2 * idle_kb, f"peak {agent_rss} kB, idle {idle_kb} kB"
    assert not cloud.on("edge/nodes/gw-test/functions/big/state")
    assert "huge" not in agent.log()


def test_spec_over_max_spec_bytes_is_rejected_before_parsing(
    agent_factory: Callable[..., AgentProcess], cloud: Cloud
) -> None:
    """A spec was parsed whatever its size: the first 100 MB of JSON cost 861 MB of RSS."""
    _ready_agent(agent_factory, cloud)
    cloud.publish("edge/fleet/functions/big", _big_spec(MB + 64 * 1024), retain=True)
    state = cloud.wait_message(
        "edge/nodes/gw-test/functions/big/state", lambda m: m["state"] == "rejected", 30
    )
    assert state["error"]["type"] == "deployment_rejected", state
    assert "agent.max_spec_bytes (1048576)" in state["error"]["message"], state
    assert "by reference" in state["error"]["message"], state
