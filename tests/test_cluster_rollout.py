"""Issue 13 on a real 3-node NATS cluster: a staged rollout survives the loss of a broker
node in its middle, and a node whose Last Will died with its broker node goes offline in
the live view and in the one-shot ``edgectl nodes``."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_cluster_failover import connect, start_agent, wait_online

from agent.cloud import RolloutReport, ctl, function_spec
from agent.errors import FunctionNotFound
from agent.models import EdgeNodeStatus
from testing.agent_process import AgentProcess
from testing.broker import NatsCluster
from testing.wait import wait_for

pytestmark = [pytest.mark.cluster_broker, pytest.mark.slow]


def test_staged_rollout_completes_with_a_broker_node_lost_midway(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    """Canaries, then the fleet, with the node most agents sit on killed during the canary
    phase: every agent ends active on the new version."""
    nats = nats_cluster
    agents: list[AgentProcess] = []
    try:
        for n in range(3):
            # 5 s heartbeats: 3 missed (15 s) outlast a NATS failover (about 9 s), so a
            # canary behind the dead node is late, not offline
            start_agent(tmp_path, nats, agents, f"gw-{n}", heartbeat_s=5.0)
        with connect(nats) as cluster:
            controller = cluster.controller
            for n in range(3):
                wait_online(controller, f"gw-{n}")
            module = tmp_path / "versioned.py"
            module.write_text("def handler(event):\n    return 'v2'\n")
            spec = function_spec(module, id="versioned", version="2")
            homes = [nats.node_of(f"edge-agent-gw-{n}") for n in range(3)]
            victim = max(set(homes), key=homes.count)
            killed = threading.Event()

            def on_progress(phase: str, report: RolloutReport) -> None:
                if phase == "canary" and not killed.is_set():
                    killed.set()
                    nats.kill(victim)

            started = time.monotonic()
            result = controller.staged_rollout(
                spec, canary=1, canary_timeout_s=90, timeout_s=120, on_progress=on_progress
            )
            elapsed = time.monotonic() - started
            assert killed.is_set()
            assert not result.rolled_back, result.notes
            assert result.fleet is not None, result.notes
            assert result.fleet.ok, {
                node: (r.state, r.error) for node, r in result.fleet.results.items()
            }
            # The fleet phase waits for the nodes it sees as not offline when it starts; a
            # node still behind the dead broker node for 3 missed heartbeats (a slow
            # failover: 2 of 6 full-suite runs here) is not waited for, and must still end
            # on the new version from the retained fleet spec, checked below for all three.
            assert set(result.fleet.results) <= {"gw-0", "gw-1", "gw-2"}
            assert set(result.canary.results) <= set(result.fleet.results), result.notes
            missed = sorted({"gw-0", "gw-1", "gw-2"} - set(result.fleet.results))
            print(
                f"\nstaged rollout with node {victim} killed in the canary phase: "
                f"{elapsed:.1f}s; seen offline when the fleet phase began: {missed or 'none'}"
            )
            for n in range(3):
                # a node the fleet phase did not wait for deploys from the retained spec
                # once it is back: "not found" until then
                wait_for(
                    lambda n=n: _answers_v2(controller, f"gw-{n}"),
                    90,
                    f"gw-{n} never answered with v2",
                )
    finally:
        for agent in agents:
            agent.stop()


def _answers_v2(controller: Any, node: str) -> bool:
    try:
        return bool(controller.invoke(node, "versioned", None, timeout=20).value == "v2")
    except FunctionNotFound:
        return False


def test_node_whose_will_died_with_its_broker_node_goes_offline(
    tmp_path: Path, nats_cluster: NatsCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """The agent and its broker node die together, so no Will: the status stayed online
    for the whole outage (edgectl nodes: "online 24s ago" with a 2 s heartbeat)."""
    nats = nats_cluster
    agent = start_agent(tmp_path, nats, [], "gw-1")
    try:
        home = nats.node_of("edge-agent-gw-1")
        assert home is not None
        others = [i for i in range(nats.size) if i != home]
        with connect(nats, others) as cluster:
            wait_online(cluster.controller, "gw-1")
            lost_at = time.monotonic()
            agent.signal(signal.SIGSTOP)  # frozen: its connection stays open, no Will yet
            nats.kill(home)  # the Will dies with the node that held it
            agent.kill9()

            def offline() -> bool:
                node = cluster.controller.node("gw-1")
                return node is not None and node.status is EdgeNodeStatus.OFFLINE

            wait_for(offline, 20, "the live view never marked gw-1 offline")
            live = time.monotonic() - lost_at
            node = cluster.controller.node("gw-1")
            reason = node.metadata.get("offline_reason") if node else None
            with capsys.disabled():
                print(f"\nlive view: gw-1 offline after {live:.1f}s: {reason}")
        common = ["--broker", ",".join(nats.brokers[i] for i in others), "--protocol", "3.1.1"]

        def one_shot_offline() -> bool:
            code = ctl.main([*common, "--connect-timeout", "20", "--json", "nodes"])
            out = capsys.readouterr().out
            rows = {r["id"]: r for r in json.loads(out)} if code == 0 else {}
            return rows.get("gw-1", {}).get("status") == "offline"

        wait_for(one_shot_offline, 30, "edgectl nodes never showed gw-1 offline")
        one_shot = time.monotonic() - lost_at
        with capsys.disabled():
            print(
                f"\nWill lost (1 s heartbeats): live view offline after {live:.1f}s, "
                f"edgectl nodes after {one_shot:.1f}s"
            )
        assert live < 3 * 1.0 + 3.0, live  # 3 intervals after the last heartbeat (+ slack)
        # The one-shot view must show it offline at all (it said "online 24s ago" for the
        # whole outage): the wait above, within 30 s. How soon is printed, not asserted: it
        # adds edgectl's connect to a cluster that has just lost a node, which read 7.0 s
        # alone and 11.6-12.1 s in full-suite runs (a timed test that failed 3 times).
    finally:
        agent.stop()
