"""Issue 13, item 4: brokers that replay no retained messages to wildcard subscriptions.

RabbitMQ 3.10 (MQTT 3.1.1) delivers a retained message only to an exact-topic filter, so an
agent subscribed to ``<p>/fleet/functions/+`` never got a spec published before it started
(``function_not_found``) and edgectl saw no node. The compatibility mode: retained spec
indexes on exact topics that the agent follows with exact subscriptions, a roll call that
the agents answer live, and a probe that tells the two kinds of broker apart.

The pure parts (index messages, the agent's bookkeeping) are tested first; then a real
agent process against a RabbitMQ node of the test's own (marker ``rabbitmq_broker``), and
the probe against both RabbitMQ and Mosquitto.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cloud import FleetController, ctl
from agent.contract import protocol
from agent.contract.specindex import (
    ROLLCALL_BURST,
    ROLLCALL_MIN_INTERVAL_S,
    AnswerBudget,
    IndexFollower,
    rollcall_delay,
)
from agent.errors import BadRequest
from agent.local.cluster import EdgeCluster
from testing.agent_process import AgentProcess
from testing.broker import Mosquitto, RabbitMQ
from testing.cloud import Cloud
from testing.specs import source_spec
from testing.wait import wait_for

ECHO = "def handler(event, context=None):\n    return {'echo': event, 'fn': %r}\n"


def spec_of(fid: str, version: str = "1") -> protocol.FunctionSpec:
    raw = json.dumps(source_spec(fid, ECHO % fid, version=version)).encode()
    return protocol.decode_spec(raw, expected_id=fid)


# -- the wire: index and roll-call messages ---------------------------------------------------


def test_spec_index_round_trips_and_refuses_bad_entries() -> None:
    raw = protocol.encode_spec_index({"b-fn": "2.0", "a-fn": "1"})
    msg = json.loads(raw)
    assert list(msg) == ["functions", "ts"] and list(msg["functions"]) == ["a-fn", "b-fn"]
    assert protocol.decode_spec_index(raw) == {"a-fn": "1", "b-fn": "2.0"}
    assert protocol.decode_spec_index(b"") == {}  # a cleared topic lists nothing
    ts = protocol.now_ts()
    for bad, why in [
        ({"functions": {"a fn": "1"}, "ts": ts}, "function id"),
        ({"functions": {"f": "../x"}, "ts": ts}, "version"),
        ({"functions": ["f"], "ts": ts}, "an object"),
        ({"functions": {}}, "ts"),
    ]:
        with pytest.raises(BadRequest, match=why):
            protocol.decode_spec_index(json.dumps(bad).encode())
    with pytest.raises(ValueError):
        protocol.encode_spec_index({"f": "not/a/version"})


def test_node_catalog_round_trips_and_drops_empty_nodes() -> None:
    raw = protocol.encode_node_catalog({"gw-2": {"f": "1"}, "gw-1": {}})
    assert protocol.decode_node_catalog(raw) == {"gw-2": {"f": "1"}}
    bad = {"nodes": {"gw 1": {"f": "1"}}, "ts": protocol.now_ts()}
    with pytest.raises(BadRequest, match="node id"):
        protocol.decode_node_catalog(json.dumps(bad).encode())


def test_rollcall_window_is_clamped_and_checked() -> None:
    assert protocol.decode_rollcall(protocol.encode_rollcall("r1", 2.5)) == ("r1", 2.5)
    huge = json.dumps({"request_id": "r", "window_s": 1e9}).encode()
    assert protocol.decode_rollcall(huge) == ("r", protocol.MAX_ROLLCALL_WINDOW_S)
    for bad in ({"request_id": "r", "window_s": -1}, {"window_s": 1}, {"request_id": "r"}):
        with pytest.raises(BadRequest):
            protocol.decode_rollcall(json.dumps(bad).encode())
    delays = {rollcall_delay(protocol.encode_rollcall("r", 3.0)) for _ in range(50)}
    assert all(0 <= d <= 3.0 for d in delays) and len(delays) > 1  # jittered


def test_agent_topics_for_the_compat_mode() -> None:
    t = protocol.Topics("edge", "gw-1")
    assert t.subscriptions("yes") == t.subscriptions()  # as before: wildcards only
    subs = t.subscriptions("auto")
    # The exact index filters come after the wildcards (see IndexFollower "auto").
    assert subs[-3:] == ["edge/fleet/index", "edge/nodes/gw-1/index", "edge/fleet/rollcall"]
    assert t.classify("edge/fleet/index") == ("fleet_index", None)
    assert t.classify("edge/nodes/gw-1/index") == ("node_index", None)
    assert t.classify("edge/nodes/gw-2/index") == ("unknown", None)
    assert t.classify("edge/fleet/rollcall") == ("rollcall", None)
    assert t.classify("edge/nodes/gw-1/functions/index") == ("node_spec", "index")


# -- the agent's bookkeeping: index -> exact subscriptions -----------------------------------


def index(*fids: str) -> bytes:
    return protocol.encode_spec_index(dict.fromkeys(fids, "1"))


def test_follower_no_subscribes_to_every_listed_spec_once() -> None:
    f = IndexFollower(protocol.Topics("edge", "gw-1"), "no")
    change = f.on_index("fleet", index("a", "b"))
    assert change.subscribe == ["edge/fleet/functions/a", "edge/fleet/functions/b"]
    assert f.on_index("fleet", index("a", "b")).subscribe == []  # never twice
    node = f.on_index("node", index("a"))
    assert node.subscribe == ["edge/nodes/gw-1/functions/a"]
    f.connected()  # the client re-sends its filters itself: nothing new to ask for
    assert f.on_index("fleet", index("a", "b")).subscribe == []


def test_follower_unsubscribes_what_leaves_the_index_and_takes_it_back() -> None:
    f = IndexFollower(protocol.Topics("edge", "gw-1"), "no")
    f.on_index("fleet", index("a", "b"))
    change = f.on_index("fleet", index("b"))
    assert change.unsubscribe == ["edge/fleet/functions/a"] and change.subscribe == []
    assert f.on_index("fleet", b"").unsubscribe == ["edge/fleet/functions/b"]
    assert f.on_index("fleet", index("a")).subscribe == ["edge/fleet/functions/a"]
    assert f.subscribed == {"edge/fleet/functions/a"}


def test_follower_auto_skips_specs_the_wildcard_replayed() -> None:
    """Mosquitto replays the specs over the wildcard before the index: nothing extra."""
    f = IndexFollower(protocol.Topics("edge", "gw-1"), "auto")
    f.connected()
    f.spec_seen("edge/fleet/functions/a")
    assert f.on_index("fleet", index("a", "b")).subscribe == ["edge/fleet/functions/b"]
    f.connected()  # a new connection: a spec must be seen again to be skipped
    assert f.on_index("node", index("a")).subscribe == ["edge/nodes/gw-1/functions/a"]


def test_follower_refuses_a_bad_index_without_changing_anything() -> None:
    f = IndexFollower(protocol.Topics("edge", "gw-1"), "no")
    f.on_index("fleet", index("a"))
    with pytest.raises(BadRequest):
        f.on_index("fleet", b"{not json")
    assert f.listed["fleet"] == {"a"} and f.subscribed == {"edge/fleet/functions/a"}


# -- the controller keeps the indexes (any broker) -------------------------------------------


def test_controller_writes_the_indexes_with_every_spec(broker: Mosquitto) -> None:
    cloud = Cloud(broker.port, prefix="ix")
    try:
        with EdgeCluster.connect(port=broker.port, prefix="ix", timeout=10) as cluster:
            controller = cluster.controller
            assert controller.wildcard_replay is True  # Mosquitto: no compat mode
            controller.publish_spec(spec_of("f1"))
            controller.deploy_nodes(spec_of("f2", "7"), ["gw-1", "gw-2"])
            controller.clear_spec("f2", "gw-2")
            controller.publish_spec(spec_of("f1", "2"))

            def last(topic: str) -> Any:
                found = cloud.on(topic)
                return found[-1] if found else None

            wait_for(
                lambda: (last("ix/fleet/index") or {}).get("functions") == {"f1": "2"},
                5,
                "fleet index",
            )
            assert last("ix/nodes/gw-1/index")["functions"] == {"f2": "7"}
            assert last("ix/nodes/gw-2/index")["functions"] == {}
            assert last("ix/fleet/node-index")["nodes"] == {"gw-1": {"f2": "7"}}
        # A new controller reads them back (retained, exact topics) and builds on them.
        with EdgeCluster.connect(port=broker.port, prefix="ix", timeout=10) as cluster:
            assert cluster.controller.view.fleet_index == {"f1": "2"}
            assert cluster.controller.view.node_index == {"gw-1": {"f2": "7"}}
            cluster.controller.clear_spec("f1")
            wait_for(lambda: last("ix/fleet/index")["functions"] == {}, 5, "f1 left the index")
    finally:
        cloud.close()


def test_yes_writes_no_index(broker: Mosquitto) -> None:
    cloud = Cloud(broker.port, prefix="ix")
    try:
        with EdgeCluster.connect(
            port=broker.port, prefix="ix", timeout=10, retained_wildcards="yes"
        ) as cluster:
            cluster.controller.publish_spec(spec_of("f1"))
        wait_for(lambda: cloud.on("ix/fleet/functions/f1"), 5, "the spec itself")
        assert not cloud.on("ix/fleet/index")
    finally:
        cloud.close()


# -- a real RabbitMQ 3.10 ---------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    """Tests share one RabbitMQ node (module scope): each keeps to its own prefix."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def rabbit_agent(
    tmp_path: Path, server: RabbitMQ, prefix: str, node_id: str, mode: str = "auto"
) -> AgentProcess:
    return AgentProcess(
        tmp_path,
        server.port,
        node_id,
        mqtt={"protocol": "3.1.1", "topic_prefix": prefix, "retained_wildcards": mode},
        # Heartbeats every 30 s: a view that sees the node within a second learnt it from
        # the roll call (its status), not from a heartbeat.
        agent={"heartbeat_interval_s": 30.0},
    )


def rabbit_cluster(server: RabbitMQ, prefix: str, mode: str = "auto") -> EdgeCluster:
    return EdgeCluster.connect(
        port=server.port,
        prefix=prefix,
        protocol="3.1.1",
        heartbeat_interval_s=1.0,
        timeout=20,
        retained_wildcards=mode,
        rollcall_window_s=0.5,
    )


def ctl_args(server: RabbitMQ, prefix: str, *argv: str) -> list[str]:
    return [
        "--broker",
        f"127.0.0.1:{server.port}",
        "--protocol",
        "3.1.1",
        "--prefix",
        prefix,
        "--heartbeat-interval",
        "1",
        "--rollcall-window",
        "0.5",
        *argv,
    ]


@pytest.mark.rabbitmq_broker
def test_rabbitmq_start_time_and_no_retained_wildcards(rabbitmq: RabbitMQ, prefix: str) -> None:
    """The broker property the mode exists for, and the probe that detects it."""
    print(f"RabbitMQ MQTT listener up after {rabbitmq.started_in:.1f}s")
    with rabbit_cluster(rabbitmq, prefix) as cluster:
        assert cluster.controller.wildcard_replay is False
        started = time.monotonic()
        assert cluster.controller.probe_retained_wildcards(5) is False
        print(f"probe on RabbitMQ: {(time.monotonic() - started) * 1000:.1f} ms")


def test_probe_finds_retained_wildcards_on_mosquitto(broker: Mosquitto) -> None:
    with EdgeCluster.connect(port=broker.port, protocol="3.1.1", timeout=10) as cluster:
        assert cluster.controller.wildcard_replay is True
        started = time.monotonic()
        assert cluster.controller.probe_retained_wildcards(5) is True
        print(f"probe on Mosquitto: {(time.monotonic() - started) * 1000:.1f} ms")
    with EdgeCluster.connect(port=broker.port, timeout=10, retained_wildcards="no") as forced:
        assert forced.controller.wildcard_replay is False  # configured: no probe


@pytest.mark.rabbitmq_broker
@pytest.mark.parametrize("agent_mode", ["auto", "no"])
def test_specs_published_before_the_agent_starts_are_deployed(
    tmp_path: Path,
    rabbitmq: RabbitMQ,
    prefix: str,
    agents: list[AgentProcess],
    capsys: pytest.CaptureFixture[str],
    agent_mode: str,
) -> None:
    """The issue's case: a fleet spec and a node's own spec retained before the node
    joined; without the indexes the agent answered function_not_found."""
    fleet_spec, own_spec = spec_of("fleet-fn"), spec_of("own-fn", "3")
    with rabbit_cluster(rabbitmq, prefix) as cluster:
        cluster.controller.publish_spec(fleet_spec)
        cluster.controller.publish_spec(own_spec, "gw-rmq")
    agent = rabbit_agent(tmp_path, rabbitmq, prefix, "gw-rmq", agent_mode).start()
    agents.append(agent)
    agent.wait_log("spec index: subscribing to", 30)
    with rabbit_cluster(rabbitmq, prefix, "no") as cluster:
        controller = cluster.controller
        for spec in (fleet_spec, own_spec):
            report = controller.wait_rollout(spec, ["gw-rmq"], timeout=30)
            assert report.results["gw-rmq"].state == "active", report.to_dict()
        # Learnt by the roll call: no retained status reaches the wildcard.
        assert [n.id for n in cluster.list_nodes()] == ["gw-rmq"]
        for fid in ("fleet-fn", "own-fn"):
            result = controller.invoke("gw-rmq", fid, {"x": 1}, timeout=15)
            assert result.value == {"echo": {"x": 1}, "fn": fid}
        # Live publishes still arrive over the wildcard: a new version, then a removal.
        v2 = spec_of("fleet-fn", "2")
        controller.publish_spec(v2)
        assert controller.wait_rollout(v2, ["gw-rmq"], timeout=30).results["gw-rmq"].state == (
            "active"
        )
        controller.clear_spec("own-fn", "gw-rmq")
        wait_for(
            lambda: (
                (controller.function_states("gw-rmq").get("own-fn") or {}).get("state") == "removed"
            ),
            15,
            "own-fn removed",
        )
    assert agent.log().count("deploying fleet-fn 1") == 1, "deployed twice"

    # edgectl nodes, a new process's worth: connect, probe, roll call, table.
    started = time.monotonic()
    code = ctl.main(ctl_args(rabbitmq, prefix, "--json", "nodes"))
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    with capsys.disabled():
        print(f"\nedgectl nodes on RabbitMQ (probe, indexes, 0.5 s roll call): {elapsed:.2f}s")
    assert code == 0, err
    rows = json.loads(out)
    assert [row["id"] for row in rows] == ["gw-rmq"] and rows[0]["status"] == "online", rows


@pytest.mark.rabbitmq_broker
def test_deploy_fleet_without_nodes_fails_on_rabbitmq(
    tmp_path: Path, rabbitmq: RabbitMQ, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "echo.py"
    module.write_text("def handler(event):\n    return event\n")
    for extra in ([], ["--canary", "1"]):
        started = time.monotonic()
        code = ctl.main(
            ctl_args(rabbitmq, prefix, "deploy", str(module), "--id=f", "--fleet", *extra)
        )
        out, err = capsys.readouterr()
        assert code == ctl.EXIT_FAILED, (extra, out, err)
        assert "no node would deploy f" in err or "nothing to canary" in err, err
        assert time.monotonic() - started < 15
    # Nothing was published: no index lists f.
    with rabbit_cluster(rabbitmq, prefix, "no") as cluster:
        assert cluster.controller.view.fleet_index == {}


def test_agent_auto_on_mosquitto_adds_no_exact_subscription(
    broker: Mosquitto, agent_factory: Any
) -> None:
    with EdgeCluster.connect(port=broker.port, timeout=10) as cluster:
        cluster.controller.publish_spec(spec_of("f1"))
    agent = agent_factory("gw-mq").start()
    agent.wait_log("deploying f1 1", 15)
    with EdgeCluster.connect(port=broker.port, timeout=10, heartbeat_interval_s=1) as cluster:
        report = cluster.controller.wait_rollout(spec_of("f1"), ["gw-mq"], timeout=20)
        assert report.results["gw-mq"].state == "active"
    assert "spec index: subscribing" not in agent.log()


def test_controller_api_rejects_an_unknown_mode() -> None:
    from agent.mqtt import MqttSettings

    with pytest.raises(ValueError, match="retained_wildcards"):
        FleetController(MqttSettings(), retained_wildcards="maybe")


# -- hostile input on the compatibility topics ------------------------------------------------


def test_an_index_too_long_or_too_big_is_refused_before_anything_is_subscribed() -> None:
    """A retained index listing 90,000 ids blocked an agent's loop for a minute (one exact
    subscription per id): an index lists at most MAX_INDEX_FUNCTIONS ids in at most
    MAX_INDEX_BYTES bytes, and the agent's follower changes nothing when refused."""
    ts = protocol.now_ts()
    many = {f"f{i}": "1" for i in range(protocol.MAX_INDEX_FUNCTIONS + 1)}
    with pytest.raises(BadRequest, match="functions, over the 1000"):
        protocol.decode_spec_index(json.dumps({"functions": many, "ts": ts}).encode())
    with pytest.raises(ValueError, match="over the 1000"):
        protocol.encode_spec_index(many)
    big = json.dumps({"functions": {"f": "1"}, "ts": ts, "pad": "x" * protocol.MAX_INDEX_BYTES})
    with pytest.raises(BadRequest, match="bytes, over the"):
        protocol.decode_spec_index(big.encode())
    at_most = {f"f{i}": "1" for i in range(protocol.MAX_INDEX_FUNCTIONS)}
    assert len(protocol.decode_spec_index(protocol.encode_spec_index(at_most))) == 1000


def test_the_answer_budget_allows_a_burst_then_one_per_interval() -> None:
    budget = AnswerBudget(burst=3, interval_s=2.0)
    for _ in range(3):  # a few commands in a row: each answered at its own delay
        assert budget.due(100.0, 0.5) == 100.5
        budget.spend(100.5)
    assert budget.due(100.5, 0.0) == pytest.approx(102.5)  # then one per interval
    budget.spend(102.5)
    assert budget.due(102.5, 0.1) == pytest.approx(104.5)
    assert budget.due(200.0, 0.1) == 200.1  # refilled after a quiet while


def test_a_roll_call_flood_is_answered_at_a_bounded_rate(cloud: Cloud, agent_factory: Any) -> None:
    """Twenty roll calls with a zero window at once: one answer (they share it). Then calls
    one after another, each sent once the previous was answered: the burst allowance goes,
    then the answers come ROLLCALL_MIN_INTERVAL_S apart, not as fast as the calls (each
    answer is the status, every function state, and store writes)."""
    agent_factory("gw-rc").start()
    status = "edge/nodes/gw-rc/status"
    cloud.wait_message(status, lambda m: m["status"] == "online", 20)
    before = len(cloud.on(status))

    def answers() -> int:
        return len(cloud.on(status)) - before

    started = time.monotonic()
    for i in range(20):
        cloud.publish("edge/fleet/rollcall", protocol.encode_rollcall(f"flood-{i}", 0.0))
    wait_for(lambda: answers() >= 1, 10, "the agent never answered the roll calls")
    for n in range(2, 2 + ROLLCALL_BURST + 1):  # each call once the one before is answered
        cloud.publish("edge/fleet/rollcall", protocol.encode_rollcall(f"next-{n}", 0.0))
        wait_for(lambda n=n: answers() >= n, 10, f"roll call {n} was never answered")
    elapsed = time.monotonic() - started
    allowed = ROLLCALL_BURST + 1 + elapsed / ROLLCALL_MIN_INTERVAL_S
    assert answers() <= allowed, f"{answers()} answers in {elapsed:.1f}s to 24 roll calls"
    assert elapsed >= ROLLCALL_MIN_INTERVAL_S - 0.5, "no answer ever waited for the budget"
