"""Issue 13: a node whose Last Will was lost (its broker node died with its connection) must
not stay ``online``: every view, the one-shot ``edgectl nodes`` included, marks it offline
once its retained status is older than three heartbeat intervals plus its refresh period."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.cloud import FleetView, ctl
from agent.contract import protocol
from agent.models import EdgeNodeStatus
from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.wait import wait_for


def status(node_id: str, age_s: float, *, interval: float = 1.0, refresh: float = 3.0) -> bytes:
    body = json.loads(
        protocol.encode_status(
            node_id,
            "online",
            agent_version="test",
            name=node_id,
            location="",
            capabilities=[],
            extra={"heartbeat_interval_s": interval, "status_refresh_s": refresh},
        )
    )
    ts = datetime.now(UTC) - timedelta(seconds=age_s)
    body["ts"] = ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps(body).encode()


def test_view_judges_a_retained_status_by_its_ts() -> None:
    """A retained online status once counted as heard now, whatever its age."""
    view = FleetView("edge", heartbeat_interval_s=30.0)
    wall = datetime.now(UTC).timestamp()
    view.ingest("edge/nodes/fresh/status", status("fresh", 1), now=100.0, retained=True, wall=wall)
    view.ingest("edge/nodes/stale/status", status("stale", 7), now=100.0, retained=True, wall=wall)
    # 3 x 1 s + 3 s refresh = 6 s: "stale" (7 s) is offline, "fresh" (1 s) online until 105 s
    states = {n.id: n.status for n in view.nodes(100.0)}
    assert states == {"fresh": EdgeNodeStatus.ONLINE, "stale": EdgeNodeStatus.OFFLINE}
    assert view.nodes(105.5)[0].status is EdgeNodeStatus.OFFLINE
    assert "status refresh" in view.nodes(105.5)[0].metadata["offline_reason"]
    # a live heartbeat brings the exact rule back (3 intervals, no refresh grace)
    beat = protocol.encode_heartbeat("fresh", 1, 1.0, "online", _system(), [], {"interval_s": 1})
    view.ingest("edge/nodes/fresh/heartbeat", beat, now=106.0)
    assert view.nodes(108.9)[0].status is EdgeNodeStatus.ONLINE
    assert view.nodes(109.1)[0].status is EdgeNodeStatus.OFFLINE


def _system() -> dict[str, Any]:
    return {
        "cpu_percent": 1.0,
        "memory_used_mb": 1.0,
        "memory_total_mb": 2.0,
        "disk_free_mb": 1.0,
        "load_1m": 0.0,
    }


def test_one_shot_nodes_marks_a_node_whose_will_was_lost_offline(
    broker: Mosquitto, cloud: Cloud, capsys: pytest.CaptureFixture[str]
) -> None:
    """edgectl nodes said "online 24s ago" for a node silent for 24 s (2 s heartbeats)."""
    cloud.publish("edge/nodes/gone/status", status("gone", 24, interval=2, refresh=6), retain=True)
    cloud.publish("edge/nodes/here/status", status("here", 1, interval=2, refresh=6), retain=True)
    code = ctl.main(["--broker", f"127.0.0.1:{broker.port}", "--json", "nodes"])
    assert code == 0
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["gone"]["status"] == "offline", rows["gone"]
    assert "no heartbeat for 24" in rows["gone"]["offline_reason"]
    assert rows["here"]["status"] == "online", rows["here"]


def test_agent_refreshes_its_retained_status(
    agent_factory: Any, cloud: Cloud, capsys: pytest.CaptureFixture[str]
) -> None:
    """The agent republishes its retained status every 3 heartbeats, with its interval, so a
    one-shot view sees it online long after it connected, and offline once it is gone."""
    agent: AgentProcess = agent_factory("gw-fresh").start()
    topic = "edge/nodes/gw-fresh/status"
    first = cloud.wait_message(topic, lambda m: m["status"] == "online", timeout=15)
    assert first["heartbeat_interval_s"] == 1.0 and first["status_refresh_s"] == 3.0
    wait_for(
        lambda: len([m for m in cloud.on(topic) if m["status"] == "online"]) >= 3,
        15,
        "the agent did not republish its status every 3 heartbeats",
    )
    code = ctl.main(["--broker", f"127.0.0.1:{cloud.port}", "--json", "nodes"])
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    assert code == 0 and rows["gw-fresh"]["status"] == "online", rows
    agent.kill9()  # the Will fires here (mosquitto lives): offline at once
    cloud.wait_message(topic, lambda m: m["status"] == "offline", timeout=15)
