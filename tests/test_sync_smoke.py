"""State sync end to end once: a handler's writes become deltas, a request gets a snapshot."""

from __future__ import annotations

import hashlib
import json

from testing.agent_process import AgentProcess
from testing.cloud import Cloud
from testing.specs import source_spec

COUNTER = (
    "def handler(event, context):\n"
    "    n = context.state.get('count', 0) + event\n"
    "    context.state.set('count', n)\n"
    "    return {'count': n, 'desired': dict(context.desired)}\n"
)


def checksum(data: dict) -> str:  # type: ignore[type-arg]
    raw = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(raw).hexdigest()


def test_counter_handler_reports_deltas_and_snapshot(cloud: Cloud, agent_factory) -> None:  # type: ignore[no-untyped-def]
    """Each successful write is a delta with the checksum of the whole state after it."""
    agent: AgentProcess = agent_factory().start()
    cloud.wait_message("edge/nodes/gw-test/status", lambda m: m["status"] == "online")
    cloud.deploy(None, source_spec("counter", COUNTER))
    cloud.wait_message(
        "edge/nodes/gw-test/functions/counter/state", lambda m: m["state"] == "active"
    )
    cloud.publish(
        "edge/nodes/gw-test/sync/desired", {"version": 1, "data": {"mode": "eco"}}, retain=True
    )
    first = cloud.invoke("gw-test", "counter", 2)
    assert first["result"]["count"] == 2
    second = cloud.invoke("gw-test", "counter", 3)
    assert second["result"] == {"count": 5, "desired": {"mode": "eco"}}
    delta = cloud.wait_message("edge/nodes/gw-test/sync/delta", lambda m: m["to_version"] == 2)
    assert delta["changes"] == {"count": 5}
    assert delta["checksum"] == checksum({"count": 5})
    cloud.publish("edge/nodes/gw-test/sync/request", {"request_id": "snap-1"})
    snap = cloud.wait_message(
        "edge/nodes/gw-test/sync/snapshot", lambda m: m["request_id"] == "snap-1"
    )
    assert snap["version"] == 2 and snap["data"] == {"count": 5}
    assert snap["checksum"] == checksum({"count": 5})
    agent.stop()


def test_mirror_follows_handler_writes_and_sets_desired(  # type: ignore[no-untyped-def]
    cloud: Cloud, broker, agent_factory
) -> None:
    """The cloud mirror started late catches up by snapshot, then by deltas (one delta per
    change: without the linger, version 1's delta is gone before the mirror starts)."""
    from agent.cloud.mirror import MirrorClient
    from agent.mqtt import MqttSettings

    agent: AgentProcess = agent_factory(outbox={"delta_linger_ms": 0}).start()
    cloud.wait_message("edge/nodes/gw-test/status", lambda m: m["status"] == "online")
    cloud.deploy(None, source_spec("counter", COUNTER))
    cloud.wait_message(
        "edge/nodes/gw-test/functions/counter/state", lambda m: m["state"] == "active"
    )
    cloud.invoke("gw-test", "counter", 1)  # version 1 happens before the mirror exists
    mirror = MirrorClient(MqttSettings(port=broker.port, client_id="mirror-test")).start()
    try:
        cloud.invoke("gw-test", "counter", 1)  # 1 -> 2: a gap for the mirror, so a snapshot
        state = mirror.mirror.wait_for("gw-test", lambda s: s.version >= 2, timeout=10)
        assert state is not None and state.data == {"count": 2}, state
        assert mirror.mirror.snapshots_requested("gw-test") == 1
        cloud.invoke("gw-test", "counter", 5)
        state = mirror.mirror.wait_for("gw-test", lambda s: s.version >= 3, timeout=10)
        assert state is not None and state.data == {"count": 7} and state.verify()
        version = mirror.set_desired("gw-test", {"mode": "boost"})
        # The mirror's publish and the cloud's invoke travel on two connections: wait for the
        # agent to have applied the desired state before invoking.
        agent.wait_log(f"applied desired state version {version}")
        reply = cloud.invoke("gw-test", "counter", 0)
        assert reply["result"]["desired"] == {"mode": "boost"}, (version, reply)
    finally:
        mirror.stop()
        agent.stop()
