"""Issue 13: edgectl on a clustered broker. A broker list (``--broker`` repeated or a comma
list) survives a dead node, one-shot commands stay quick on a 3-node NATS cluster (the
view's subscriptions at QoS 0), and ``deploy --fleet`` with no target says so and fails."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest

from agent.cloud import ctl
from testing.agent_process import AgentProcess
from testing.broker import Mosquitto, NatsCluster
from testing.ports import free_port
from testing.wait import wait_for


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str, float]:
    started = time.monotonic()
    code = ctl.main(list(argv))
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    return code, out, err, elapsed


def test_deploy_to_a_fleet_without_targets_fails_clearly(
    tmp_path: Path, broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """deploy --fleet to a fleet the controller cannot see once printed "0 nodes" and exited 0
    (a broker without retained-to-wildcard delivery shows no node at all)."""
    module = tmp_path / "echo.py"
    module.write_text("def handler(event):\n    return event\n")
    code, out, err, _ = run(
        capsys, "--broker", f"127.0.0.1:{broker.port}", "deploy", str(module), "--id=f", "--fleet"
    )
    assert code == ctl.EXIT_FAILED, (out, err)
    assert "no node would deploy f" in err and "nothing was published" in err


def test_broker_list_skips_a_dead_entry(
    broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """edgectl took one host:port: with that node down it failed (saying "no CONNACK")."""
    dead = f"127.0.0.1:{free_port()}"
    for _ in range(3):  # the start is random: both orders come up
        code, out, err, elapsed = run(
            capsys,
            "--broker",
            f"{dead},127.0.0.1:{broker.port}",
            "--connect-timeout",
            "10",
            "--json",
            "nodes",
        )
        assert code == 0, err
        assert json.loads(out) == []
        assert elapsed < 5, f"{elapsed:.1f}s to get past a dead broker"


@pytest.mark.cluster_broker
@pytest.mark.slow
def test_edgectl_on_a_nats_cluster_is_quick_and_survives_its_node(
    tmp_path: Path, nats_cluster: NatsCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """edgectl took about 3 s per command on a NATS cluster (a replicated consumer per QoS 1
    subscription) and, with its node down, failed with a misleading "no CONNACK"."""
    nats = nats_cluster
    agent = AgentProcess(
        tmp_path,
        nats.mqtt_ports[0],
        "gw-1",
        mqtt={"brokers": nats.brokers, "protocol": "3.1.1"},
        agent={"heartbeat_interval_s": 1.0},
    ).start()
    common = ["--broker", ",".join(nats.brokers), "--protocol", "3.1.1", "--json"]
    try:
        module = tmp_path / "echo.py"
        module.write_text("def handler(event):\n    return event\n")

        def node_online() -> bool:
            code, out, _, _ = run(capsys, *common, "nodes")
            return code == 0 and any(
                r["id"] == "gw-1" and r["status"] == "online" for r in json.loads(out)
            )

        wait_for(node_online, 60, "edgectl nodes never listed gw-1 online")
        code, out, err, _ = run(capsys, *common, "deploy", str(module), "--id=echo", "--fleet")
        assert code == 0, err
        timings: dict[str, list[float]] = {"nodes": [], "invoke": []}
        for n in range(5):
            code, out, err, elapsed = run(capsys, *common, "nodes")
            assert code == 0, err
            timings["nodes"].append(elapsed)
            code, out, err, elapsed = run(
                capsys, *common, "invoke", "gw-1", "echo", "--payload", str(n)
            )
            assert code == 0 and json.loads(out)["result"] == n, err
            timings["invoke"].append(elapsed)
        report = {k: (statistics.median(v), max(v)) for k, v in timings.items()}
        with capsys.disabled():
            print(f"\nedgectl on 3-node NATS (in-process, p50/max s): {report}")
        assert report["nodes"][0] < 1.0 and report["invoke"][0] < 1.0, report

        home = nats.node_of("edge-agent-gw-1")
        victim = next(i for i in range(nats.size) if i != home)  # not the agent's node
        nats.kill(victim)
        for _ in range(3):  # whichever node edgectl tries first
            code, out, err, elapsed = run(capsys, *common, "--connect-timeout", "20", "nodes")
            assert code == 0, err
            with capsys.disabled():
                print(f"edgectl nodes with node {victim} dead: {elapsed:.2f}s")
            # invoke's reply subscription is QoS 1: a JetStream consumer, which waits for the
            # streams the dead node led to elect new leaders (seconds)
            code, out, err, elapsed = run(
                capsys,
                *common,
                "--connect-timeout",
                "30",
                "invoke",
                "gw-1",
                "echo",
                "--payload",
                "1",
            )
            assert code == 0, err
            with capsys.disabled():
                print(f"edgectl invoke with node {victim} dead: {elapsed:.2f}s")
    finally:
        agent.stop()
