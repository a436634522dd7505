"""Issue 13, brokers with an ack deadline: an invoke is acknowledged once it is durably
accepted (``agent/store/accepted.py``), not when its reply is ready, so NATS's ``ack_wait``
no longer delivers a long invocation again while it runs, and an agent killed mid-run runs
it again at start and answers it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_cluster_failover import connect as connect_nats
from test_cluster_failover import deploy as deploy_nats

from agent.cloud import function_spec
from agent.local.cluster import EdgeCluster
from testing.agent_process import AgentProcess
from testing.broker import Mosquitto, NatsCluster
from testing.wait import wait_for

COUNTING = """\
import time


def handler(event):
    with open(event["log"], "a") as log:
        log.write(event["tag"] + "\\n")
    time.sleep(float(event.get("sleep", 0)))
    return {"tag": event["tag"]}
"""


def runs(path: Path, tag: str) -> int:
    return path.read_text().split().count(tag) if path.exists() else 0


@pytest.mark.cluster_broker
@pytest.mark.slow
def test_invocation_longer_than_the_ack_wait_runs_and_answers_once(tmp_path: Path) -> None:
    """A 40 s invocation with NATS's 30 s ack wait ran once but got two replies (here: 8 s
    against an ack wait of 3 s)."""
    nats = NatsCluster(tmp_path, ack_wait="3s").start()
    agent = AgentProcess(
        tmp_path,
        nats.mqtt_ports[0],
        "gw-1",
        mqtt={"brokers": nats.brokers, "protocol": "3.1.1"},
        agent={"heartbeat_interval_s": 1.0},
    ).start()
    try:
        with connect_nats(nats) as cluster:
            deploy_nats(tmp_path, cluster, "count", source=COUNTING)
            log = tmp_path / "runs.log"
            result = cluster.controller.invoke(
                "gw-1", "count", {"log": str(log), "tag": "long", "sleep": 8}, timeout=30
            )
            assert result.value == {"tag": "long"}
            # Past two more ack waits: a redelivery would have run or answered again.
            deadline = time.monotonic() + 7
            wait_for(lambda: time.monotonic() >= deadline, 8, "")
            assert runs(log, "long") == 1
            assert cluster.controller.stats["late_replies"] == 0, "a second reply came"
    finally:
        agent.stop()
        nats.stop()


def _cut_by_kill9(
    tmp_path: Path, agent: AgentProcess, broker: Mosquitto, *, on_record: bool
) -> tuple[Any, int]:
    """Start an invocation of 3 s, kill -9 the agent in the middle (once it is on record
    as accepted, or while it is not), start it again: (the answer, how often it ran)."""
    module = tmp_path / "count.py"
    module.write_text(COUNTING)
    with EdgeCluster.connect("127.0.0.1", broker.port, heartbeat_interval_s=1.0) as cluster:
        controller = cluster.controller
        controller.deploy_fleet(function_spec(module, id="count", timeout_seconds=30))
        wait_for(lambda: "count" in controller.active_functions("gw-1"), 20, "count never active")
        log = tmp_path / "runs.log"
        answered: dict[str, Any] = {}

        def call() -> None:
            answered["r"] = controller.invoke(
                "gw-1", "count", {"log": str(log), "tag": "cut", "sleep": 3}, timeout=40
            )

        caller = threading.Thread(target=call)
        caller.start()
        wait_for(lambda: runs(log, "cut") == 1, 15, "the invocation never started")
        if on_record:
            wait_for(lambda: len(agent.accepted_on_record()) == 1, 5, "it never went on record")
        else:
            assert agent.accepted_on_record() == []
        agent.kill9()
        agent.start()
        caller.join(45)
        assert "r" in answered, f"never answered after the restart:\n{agent.log()[-3000:]}"
        return answered["r"], runs(log, "cut")


def test_invoke_accepted_before_a_kill9_is_answered_after_the_restart(
    tmp_path: Path, broker: Mosquitto, agent_factory: Any
) -> None:
    """On record as accepted (it ran past ``record_accepted_after_s``, and was acknowledged
    then), an invoke cut by a crash must still be answered: the restarted agent runs it
    again from its accepted record (the broker will not resend)."""
    agent: AgentProcess = agent_factory("gw-1", agent={"record_accepted_after_s": 0.5}).start()
    result, ran = _cut_by_kill9(tmp_path, agent, broker, on_record=True)
    assert result.value == {"tag": "cut"}
    assert ran == 2  # at least once: the cut run, then the recovered one
    assert "accepted before a restart" in agent.log()


def test_invoke_cut_by_a_kill9_before_it_went_on_record_is_delivered_again(
    tmp_path: Path, broker: Mosquitto, agent_factory: Any
) -> None:
    """Issue 15's lazy record: an invocation not yet on record is not acknowledged either,
    so the broker (a persistent session) delivers it again to the restarted agent, which
    runs and answers it."""
    agent: AgentProcess = agent_factory("gw-1", agent={"record_accepted_after_s": 60.0}).start()
    result, ran = _cut_by_kill9(tmp_path, agent, broker, on_record=False)
    assert result.value == {"tag": "cut"}
    assert ran == 2
    assert "accepted before a restart" not in agent.log()
