"""Staged rollouts against real agents and simulated nodes: canaries that pass and widen to
the fleet, canaries that fail and are rolled back, the failure threshold, per-node specs
restored, and nodes that join later converging on the retained fleet spec."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from fleetutil import versioned_module
from paho.mqtt.enums import CallbackAPIVersion

from agent.cloud import deploy as deploy_module
from agent.cloud import function_spec
from agent.cloud import rollout as ro
from agent.contract import protocol
from agent.local.cluster import EdgeCluster
from agent.models import EdgeNodeStatus
from agent.trust import generate_keypair
from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import connect, wait_status
from testing.fleet_sim import sim_fleet
from testing.wait import wait_for

AgentFactory = Callable[..., AgentProcess]
NODES = ("gw-a", "gw-b", "gw-c")


@pytest.fixture
def fleet_v1(
    broker: Mosquitto, agent_factory: AgentFactory, tmp_path: Path
) -> Iterator[EdgeCluster]:
    """Three real agents serving ``ver`` version 1 from the fleet spec."""
    for node_id in NODES:
        agent_factory(node_id).start()
    cluster = connect(broker.port, heartbeat_interval_s=1.0)
    for node_id in NODES:
        wait_status(cluster, node_id, EdgeNodeStatus.ONLINE, 30)
    v1 = function_spec(versioned_module(tmp_path / "v1", "1"), id="ver", version="1")
    assert cluster.deploy_to_all(v1) == 3
    report = cluster.wait_for_rollout(v1, timeout=30)
    assert report.ok, report.to_dict()
    yield cluster
    cluster.close()


def serving(cluster: EdgeCluster, node_id: str) -> str:
    runtime = cluster.get_runtime(node_id)
    assert runtime is not None
    return str(runtime.invoke("ver", None)["version"])


def test_canary_failure_rolls_the_canaries_back_to_the_previous_version(
    fleet_v1: EdgeCluster, tmp_path: Path
) -> None:
    """v2 fails to import on the canary: the rollout stops there, the canary's override is
    cleared so it redeploys the fleet's v1 and serves it, and no other node ever saw v2."""
    cluster = fleet_v1
    v2 = function_spec(versioned_module(tmp_path / "v2", "2", broken=True), id="ver", version="2")
    phases: list[str] = []
    result = cluster.rollout(
        v2, canary=1, canary_timeout=30, timeout=30, on_progress=lambda p, r: phases.append(p)
    )

    assert result.rolled_back and not result.ok and result.fleet is None
    (canary,) = result.canaries
    failed = result.canary.results[canary]
    assert failed.state == "failed", result.to_dict()
    assert failed.error is not None and "version 2 cannot start" in failed.error["message"]
    assert result.rollback is not None and result.rollback.ok, result.to_dict()
    assert result.rollback.version == "1"
    assert "canary" in phases and "rollback" in phases and "fleet" not in phases

    controller = cluster.controller
    assert (canary, "ver") not in controller.view.node_specs
    fleet_spec = protocol.decode_spec(controller.view.fleet_specs["ver"])
    assert fleet_spec.version == "1"
    for node_id in NODES:
        assert serving(cluster, node_id) == "1"
        state = controller.function_states(node_id)["ver"]
        assert (state["version"], state["state"]) == ("1", "active")


def test_canary_success_widens_to_the_fleet_and_clears_the_overrides(
    fleet_v1: EdgeCluster, tmp_path: Path
) -> None:
    """Good canaries: the fleet spec becomes v2, the canaries follow it, all serve v2."""
    cluster = fleet_v1
    v2 = function_spec(versioned_module(tmp_path / "v2", "2"), id="ver", version="2")
    result = cluster.rollout(v2, canary="34%", canary_timeout=30, timeout=30)

    assert result.ok, result.to_dict()
    assert len(result.canaries) == 2  # ceil(34% of 3)
    assert result.fleet is not None and sorted(result.fleet.results) == sorted(NODES)
    view = cluster.controller.view
    wait_for(
        lambda: not any(key[1] == "ver" for key in view.node_specs),
        5,
        f"canary overrides were not cleared: {sorted(view.node_specs)}",
    )
    assert protocol.decode_spec(view.fleet_specs["ver"]).version == "2"
    assert [serving(cluster, n) for n in NODES] == ["2", "2", "2"]


def test_late_joiner_converges_to_the_fleet_spec(
    broker: Mosquitto, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """A node that connects after the deployment gets the retained fleet spec by itself."""
    agent_factory("gw-a").start()
    with connect(broker.port, heartbeat_interval_s=1.0) as cluster:
        wait_status(cluster, "gw-a", EdgeNodeStatus.ONLINE, 30)
        v1 = function_spec(versioned_module(tmp_path / "v1", "1"), id="ver", version="1")
        assert cluster.deploy_to_all(v1) == 1
        assert cluster.wait_for_rollout(v1, timeout=30).ok

        agent_factory("gw-late").start()
        with sim_fleet(broker.port, 3, id_format="late-{:02d}"):
            wait_status(cluster, "gw-late", EdgeNodeStatus.ONLINE, 30)
            late = ["gw-late", "late-00", "late-01", "late-02"]
            report = cluster.wait_for_rollout(v1, late, timeout=30)
            assert report.ok, report.to_dict()
        assert serving(cluster, "gw-late") == "1"


def test_rollback_restores_a_canarys_own_previous_spec(broker: Mosquitto, tmp_path: Path) -> None:
    """A canary that had its own per-node spec gets exactly that spec back."""
    (tmp_path / "echo.py").write_text("def handler(e):\n    return e\n")
    with sim_fleet(broker.port, 4) as _, connect(broker.port, heartbeat_interval_s=1.0) as c:
        base = function_spec(tmp_path / "echo.py", id="echo", version="1")
        own = function_spec(tmp_path / "echo.py", id="echo", version="1-own")
        c.deploy_to_all(base)
        for node in c.list_nodes():
            c.deploy_to_node(node.id, own)
        assert c.wait_for_rollout(own, timeout=10).ok
        own_raw = {k: v for k, v in c.controller.view.node_specs.items()}

        bad = function_spec(
            tmp_path / "echo.py", id="echo", version="2", environment={"FLEET_SIM_FAIL": "all"}
        )
        result = c.rollout(bad, canary=2, canary_timeout=10, timeout=10)
        assert result.rolled_back
        assert result.rollback is not None and result.rollback.ok
        assert result.rollback.version == "1-own"
        assert c.controller.view.node_specs == own_raw


def test_failures_within_the_threshold_do_not_stop_the_rollout(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """max_failures=1: one failing canary of two is tolerated; the fleet phase reports it."""
    (tmp_path / "echo.py").write_text("def handler(e):\n    return e\n")
    with sim_fleet(broker.port, 6) as _, connect(broker.port, heartbeat_interval_s=1.0) as c:
        probe = function_spec(tmp_path / "echo.py", id="echo")
        with c.controller._cond:  # the canaries the rollout will pick (stable per function id)
            canaries = ro.pick_canaries(c.controller.view, probe, 0.0, 2)
        spec = function_spec(
            tmp_path / "echo.py", id="echo", environment={"FLEET_SIM_FAIL": canaries[0]}
        )
        result = c.rollout(spec, canary=2, max_failures=1, canary_timeout=10, timeout=10)
        assert not result.rolled_back and result.canaries == canaries
        assert result.fleet is not None
        assert result.fleet.nodes_in("failed") == [canaries[0]]
        assert result.fleet.counts()["active"] == 5
        assert not result.ok


def test_a_canary_whose_spec_delivery_was_lost_gets_it_again(
    broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that acknowledges a canary's spec and loses its delivery (a NATS cluster
    electing leaders): the controller publishes the canary's spec again after REPUSH_S, so
    the rollout completes instead of rolling back after ``canary_timeout_s``. The node here
    is a bare MQTT client that drops the first spec it is sent. The controller signs: the
    repeat must be the same bytes (signing again would be a new spec with a new sequence,
    which restarts a deploy already in progress on a node that did get the first)."""
    monkeypatch.setattr(deploy_module, "REPUSH_S", 0.5)
    node_id, base = "gw-deaf", "edge/nodes/gw-deaf"
    received: list[str] = []
    payloads: list[bytes] = []
    node = paho.Client(CallbackAPIVersion.VERSION2, client_id=node_id)

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if not msg.payload:  # a cleared per-node spec
            return
        spec = protocol.decode_spec(msg.payload)
        received.append(msg.topic)
        payloads.append(bytes(msg.payload))
        if len(received) == 1:
            return  # lost on the way
        state = protocol.encode_function_state(
            spec.id, spec.version, spec.code.sha256, "active", None
        )
        client.publish(f"{base}/functions/{spec.id}/state", state, qos=1, retain=True)

    node.on_message = on_message
    node.connect("127.0.0.1", broker.port)
    node.subscribe([(f"{base}/functions/+", 1), ("edge/fleet/functions/+", 1)])
    status = protocol.encode_status(
        node_id, "online", agent_version="sim", name=node_id, location="", capabilities=[]
    )
    node.loop_start()
    node.publish(f"{base}/status", status, qos=1, retain=True).wait_for_publish(10)
    try:
        keys = tmp_path / "keys"
        keys.mkdir()
        generate_keypair(keys / "ctl")
        with connect(broker.port, heartbeat_interval_s=30.0, sign_key=str(keys / "ctl")) as cluster:
            wait_status(cluster, node_id, EdgeNodeStatus.ONLINE, 10)
            spec = function_spec(versioned_module(tmp_path / "v1", "1"), id="ver", version="1")
            result = cluster.controller.staged_rollout(
                spec, canary=1, canary_timeout_s=20, timeout_s=20
            )
            assert result.ok, result.to_dict()
            assert received[:2] == [f"{base}/functions/ver"] * 2, received
            assert payloads[0] == payloads[1], "the repeat was signed again"
            assert "signature" in json.loads(payloads[0])
            assert cluster.controller.stats["specs_repushed"] >= 1
    finally:
        node.loop_stop()
        node.disconnect()


def test_a_target_that_drops_offline_mid_rollout_is_waited_for(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A node online when the rollout starts goes offline in its middle (its broker node
    died: a NATS failover outlasted three heartbeats in CI) and comes back with the spec
    active: the wait reports it active, not ``offline`` the moment it dropped."""
    node_id, base = "gw-blip", "edge/nodes/gw-blip"
    node = paho.Client(CallbackAPIVersion.VERSION2, client_id=node_id)

    def status(value: str) -> bytes:
        return protocol.encode_status(
            node_id, value, agent_version="sim", name=node_id, location="", capabilities=[]
        )

    def come_back(spec: protocol.FunctionSpec) -> None:
        wait_for(
            lambda: (
                (n := cluster.get_node(node_id)) is not None and n.status is EdgeNodeStatus.OFFLINE
            ),
            10,
            "the controller never saw the node offline",
        )
        node.publish(f"{base}/status", status("online"), qos=1, retain=True)
        state = protocol.encode_function_state(
            spec.id, spec.version, spec.code.sha256, "active", None
        )
        node.publish(f"{base}/functions/{spec.id}/state", state, qos=1, retain=True)

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if msg.payload:
            client.publish(f"{base}/status", status("offline"), qos=1, retain=True)
            spec = protocol.decode_spec(msg.payload)
            threading.Thread(target=come_back, args=(spec,), daemon=True).start()

    node.on_message = on_message
    node.connect("127.0.0.1", broker.port)
    node.loop_start()
    node.subscribe(f"{base}/functions/+", 1)
    node.publish(f"{base}/status", status("online"), qos=1, retain=True).wait_for_publish(10)
    try:
        with connect(broker.port, heartbeat_interval_s=30.0) as cluster:
            wait_status(cluster, node_id, EdgeNodeStatus.ONLINE, 10)
            spec = function_spec(versioned_module(tmp_path / "v1", "1"), id="ver", version="1")
            cluster.controller.deploy_nodes(spec, [node_id])
            report = cluster.controller.wait_rollout(spec, [node_id], timeout=20)
            assert report.results[node_id].state == "active", report.to_dict()
            assert not report.timed_out
    finally:
        node.loop_stop()
        node.disconnect()
