"""EdgeCluster in remote mode against a real broker, real agents and simulated nodes:
discovery, Last Will and heartbeat staleness, remote invoke and its error classes, the
seed's API, and a 50-node rollout."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.cloud import BrokerUnreachable, RemoteRuntime, ReplyTimeout, function_spec
from agent.cloud import invoke as invoke_module
from agent.errors import FunctionNotFound, FunctionTimeout, HandlerError
from agent.models import EdgeNode, EdgeNodeStatus
from agent.mqtt import Message
from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import connect, wait_status
from testing.fleet_sim import sim_fleet
from testing.ports import free_port
from testing.wait import wait_for

AgentFactory = Callable[..., AgentProcess]


def start_agent(factory: AgentFactory, node_id: str) -> AgentProcess:
    return factory(node_id, node={"name": f"real {node_id}", "location": "rack-1"}).start()


def test_discovers_real_agents_and_simulated_nodes(
    broker: Mosquitto, agent_factory: AgentFactory
) -> None:
    """Nodes online before the controller starts are known when connect() returns."""
    agent = start_agent(agent_factory, "gw-real")
    with sim_fleet(broker.port, 5, capabilities=["python", "gpio"]):
        probe = connect(broker.port)
        wait_for(lambda: probe.get_node("gw-real"), 20, "gw-real never published its status")
        probe.close()

        with connect(broker.port, heartbeat_interval_s=1.0) as cluster:
            nodes = {n.id: n for n in cluster.list_nodes()}
            assert sorted(nodes) == ["gw-real", *[f"sim-{i:04d}" for i in range(5)]]
            real = nodes["gw-real"]
            assert (real.name, real.location, real.status) == (
                "real gw-real",
                "rack-1",
                EdgeNodeStatus.ONLINE,
            )
            assert nodes["sim-0003"].capabilities == ["python", "gpio"]
            # Heartbeats fill in the system metrics.
            wait_for(
                lambda: (cluster.get_node("gw-real") or real).metadata.get("system"),
                5,
                "no heartbeat from gw-real reached the controller",
            )
            assert len(cluster.list_nodes(EdgeNodeStatus.ONLINE)) == 6
    agent.stop()


def test_last_will_marks_nodes_offline(broker: Mosquitto, agent_factory: AgentFactory) -> None:
    """A dropped connection (kill -9 of an agent, a simulated node's socket) is OFFLINE."""
    agent = start_agent(agent_factory, "gw-real")
    with sim_fleet(broker.port, 3) as sim, connect(broker.port, heartbeat_interval_s=1.0) as c:
        wait_status(c, "gw-real", EdgeNodeStatus.ONLINE, 20)
        agent.kill9()
        sim.kill("sim-0001")
        for node_id in ("gw-real", "sim-0001"):
            node = wait_status(c, node_id, EdgeNodeStatus.OFFLINE, 10)
            assert node.metadata["offline_reason"] == "connection lost"
        assert c.get_node("sim-0000").status is EdgeNodeStatus.ONLINE  # type: ignore[union-attr]


def test_silent_node_goes_offline_after_three_heartbeat_intervals(broker: Mosquitto) -> None:
    """Heartbeats every 0.3 s: a node that stops them (still connected) is OFFLINE ~0.9 s
    later, and ONLINE again with its next heartbeat."""
    with (
        sim_fleet(broker.port, 3, heartbeat_s=0.3) as sim,
        connect(broker.port, heartbeat_interval_s=0.3) as cluster,
    ):
        wait_for(
            lambda: (cluster.get_node("sim-0002") or EdgeNode("x", "x")).metadata.get("seq"),
            5,
            "no heartbeat from sim-0002",
        )
        muted = time.monotonic()
        sim.mute("sim-0002")
        node = wait_status(cluster, "sim-0002", EdgeNodeStatus.OFFLINE, 5)
        # Its last heartbeat may have left up to one interval before the mute.
        assert time.monotonic() - muted >= 0.55, "OFFLINE before 3 intervals had passed"
        assert "no heartbeat for" in node.metadata["offline_reason"]
        assert cluster.get_node("sim-0001").status is EdgeNodeStatus.ONLINE  # type: ignore[union-attr]

        sim.mute("sim-0002", False)
        wait_status(cluster, "sim-0002", EdgeNodeStatus.ONLINE, 5)


HANDLERS = {
    "sensor": "def handler(event):\n"
    "    return {'processed': True, 'value': event['temperature'] * 1.8 + 32}\n",
    "boom": "def handler(event):\n    raise ValueError('sensor 7 unplugged')\n",
    "slow": "import time\n\ndef handler(event):\n    time.sleep(30)\n",
}


@pytest.fixture
def serving_agent(
    broker: Mosquitto, agent_factory: AgentFactory, tmp_path: Path
) -> tuple[AgentProcess, RemoteRuntime]:
    agent = start_agent(agent_factory, "gw-real")
    cluster = connect(broker.port, heartbeat_interval_s=1.0)
    wait_status(cluster, "gw-real", EdgeNodeStatus.ONLINE, 20)
    specs = []
    for fid, source in HANDLERS.items():
        path = tmp_path / f"{fid}.py"
        path.write_text(source)
        timeout = 0.5 if fid == "slow" else 5.0
        specs.append(function_spec(path, id=fid, timeout_seconds=timeout, memory_mb=64))
        cluster.deploy_to_node("gw-real", specs[-1])
    for spec in specs:
        report = cluster.wait_for_rollout(spec, ["gw-real"], timeout=20)
        assert report.ok, report.to_dict()
    runtime = cluster.get_runtime("gw-real")
    assert isinstance(runtime, RemoteRuntime)
    yield agent, runtime  # type: ignore[misc]
    cluster.close()


def test_remote_invoke_returns_the_handlers_value(
    serving_agent: tuple[AgentProcess, RemoteRuntime],
) -> None:
    _, runtime = serving_agent
    assert runtime.invoke("sensor", {"temperature": 25}) == {"processed": True, "value": 77.0}
    result = runtime.execute("sensor", {"temperature": 0})
    assert result.value["value"] == 32.0 and result.node_id == "gw-real"
    assert result.round_trip_ms > 0


def test_remote_invoke_raises_the_local_exception_classes(
    serving_agent: tuple[AgentProcess, RemoteRuntime],
) -> None:
    """handler error -> HandlerError with its message; the node's timeout -> FunctionTimeout
    (not a missing reply); unknown id -> FunctionNotFound, also a ValueError."""
    _, runtime = serving_agent
    with pytest.raises(HandlerError, match="sensor 7 unplugged"):
        runtime.invoke("boom", None)
    with pytest.raises(FunctionTimeout) as timed_out:
        runtime.invoke("slow", None)
    assert not isinstance(timed_out.value, ReplyTimeout), "the node's reply was lost"
    with pytest.raises(FunctionNotFound, match="Function not found") as missing:
        runtime.invoke("nope", 1)
    assert isinstance(missing.value, ValueError)
    with pytest.raises(ValueError, match="one JSON payload"):
        runtime.invoke("sensor", 1, 2)


def test_a_lost_reply_is_asked_for_again_and_answered_from_the_dedupe_table(
    serving_agent: tuple[AgentProcess, RemoteRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker loses the real agent's first reply (dropped here at the controller's
    ingest): the controller asks again after REPLY_REASK_S with the same request id, and the
    agent answers the copy from its dedupe table without running the handler twice."""
    agent, runtime = serving_agent
    controller = runtime._controller
    monkeypatch.setattr(invoke_module, "REPLY_REASK_S", 0.5)
    dropped: list[str] = []
    handle = controller._handle_reply

    def lossy(msg: Message) -> None:
        if not dropped:
            dropped.append(msg.correlation_data.decode() if msg.correlation_data else "?")
            return
        handle(msg)

    monkeypatch.setattr(controller, "_handle_reply", lossy)
    result = controller.invoke("gw-real", "sensor", {"temperature": 100}, timeout=10)
    assert result.value == {"processed": True, "value": 212.0}
    assert dropped == [result.request_id], dropped
    assert controller.stats["invokes_reasked"] == 1
    wait_for(
        lambda: f"duplicate request {result.request_id}: resending its reply" in agent.log(),
        5,
        "the agent did not answer the second ask from its dedupe table",
    )


def test_reply_that_never_comes_is_a_function_timeout(broker: Mosquitto) -> None:
    """A node that is gone never answers: FunctionTimeout (ReplyTimeout) saying so."""
    with sim_fleet(broker.port, 2) as sim, connect(broker.port, heartbeat_interval_s=1.0) as c:
        runtime = c.get_runtime("sim-0001")
        assert runtime is not None
        sim.kill("sim-0001")
        wait_status(c, "sim-0001", EdgeNodeStatus.OFFLINE)
        started = time.monotonic()
        with pytest.raises(FunctionTimeout, match="no reply arrived from sim-0001") as exc:
            c.controller.invoke("sim-0001", "anything", 1, timeout=0.5)
        assert isinstance(exc.value, ReplyTimeout)
        assert "offline" in str(exc.value)
        assert 0.5 <= time.monotonic() - started < 3


def test_seed_api_keeps_its_meaning_in_remote_mode(broker: Mosquitto, tmp_path: Path) -> None:
    """get_runtime(unknown) is None, heartbeat() marks ONLINE, deploy_to_all counts targets."""
    with sim_fleet(broker.port, 4) as sim, connect(broker.port, heartbeat_interval_s=1.0) as c:
        assert c.remote and c.get_runtime("ghost") is None and c.get_node("ghost") is None
        with pytest.raises(ValueError, match="register themselves"):
            c.register_node(EdgeNode(id="gw", name="gw"))
        sim.kill("sim-0003")
        wait_status(c, "sim-0003", EdgeNodeStatus.OFFLINE)
        c.heartbeat("sim-0003")  # the seed's meaning: this node is ONLINE now
        assert c.get_node("sim-0003").status is EdgeNodeStatus.ONLINE  # type: ignore[union-attr]
        sim.kill("sim-0002")
        wait_status(c, "sim-0002", EdgeNodeStatus.OFFLINE)

        (tmp_path / "echo.py").write_text("def handler(e):\n    return e\n")
        spec = function_spec(tmp_path / "echo.py", id="echo")
        assert c.deploy_to_all(spec) == 3  # sim-0002 is offline; sim-0003 marked online
        gpio = function_spec(tmp_path / "echo.py", id="gpio-echo", requires=["gpio"])
        assert c.deploy_to_all(gpio) == 0

        assert c.deregister_node("sim-0002") is True
        assert c.get_node("sim-0002") is None


def test_rollout_to_fifty_simulated_nodes_and_undeploy(broker: Mosquitto, tmp_path: Path) -> None:
    """The fleet spec reaches 50 nodes; each reports this version and sha256 active; clearing
    it removes the function everywhere."""
    with sim_fleet(broker.port, 50) as sim, connect(broker.port) as cluster:
        (tmp_path / "echo.py").write_text("def handler(e):\n    return e\n")
        spec = function_spec(tmp_path / "echo.py", id="echo")
        assert cluster.deploy_to_all(spec) == 50
        seen: list[int] = []
        report = cluster.wait_for_rollout(
            spec, timeout=20, on_progress=lambda phase, r: seen.append(r.counts()["active"])
        )
        assert report.ok and report.counts()["active"] == 50, report.to_dict()
        assert seen[-1] == 50 and seen == sorted(seen)
        runtime = cluster.get_runtime("sim-0042")
        assert runtime is not None
        assert runtime.invoke("echo", {"n": 1})["echo"] == {"n": 1}

        assert cluster.undeploy("echo") is True
        wait_for(
            lambda: all(not n.deployed for n in sim.nodes.values()),
            10,
            "some simulated nodes kept the function after the fleet spec was cleared",
        )
        wait_for(
            lambda: cluster.controller.active_functions("sim-0042") == [],
            10,
            "sim-0042's retained state still says active",
        )


def test_unreachable_broker_is_reported_quickly() -> None:
    """Nothing listens: BrokerUnreachable within the timeout, naming host and port."""
    port = free_port()
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable, match=f"127.0.0.1:{port}"):
        connect(port, timeout=1.0)
    assert time.monotonic() - started < 5
