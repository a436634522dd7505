"""What survives what: kill -9 of the agent, a broker restart, a graceful restart with work
queued in the broker session. Real agent processes, a real broker stopped and started on
the same port, the real SQLite state read back through ``edge-agent status``."""

from __future__ import annotations

import contextlib
import json
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import cli_status

from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.specs import source_spec
from testing.wait import wait_for

NODE = "gw-test"
STATUS = f"edge/nodes/{NODE}/status"
REPLIES = f"edge/nodes/{NODE}/replies"
INVOKE = f"edge/nodes/{NODE}/invoke"

AgentFactory = Callable[..., AgentProcess]

ECHO = "def handler(event):\n    return {'echo': event}\n"
#: Appends a line per run to RUNS_DIR/<name>, then sleeps: the test sees it start.
SLOWPOKE = """\
import os
import time


def handler(event):
    with open(os.path.join(os.environ['RUNS_DIR'], event['name']), 'a') as runs:
        runs.write('ran\\n')
    time.sleep(event['sleep'])
    return {'done': event['name']}
"""


@contextlib.contextmanager
def fresh_cloud(broker: Mosquitto) -> Iterator[Cloud]:
    """A test cloud subscribed on the (restarted) broker; the old one lost its session."""
    cloud = Cloud(broker.port)
    try:
        yield cloud
    finally:
        cloud.close()


def wait_online(cloud: Cloud) -> None:
    cloud.wait_message(STATUS, lambda m: m["status"] == "online")


def deploy_active(cloud: Cloud, spec: dict[str, Any]) -> None:
    cloud.deploy(None, spec)
    cloud.wait_message(
        f"edge/nodes/{NODE}/functions/{spec['id']}/state", lambda m: m["state"] == "active"
    )


def slowpoke(runs_dir: Path) -> dict[str, Any]:
    return source_spec("slowpoke", SLOWPOKE, environment={"RUNS_DIR": str(runs_dir)})


def runs(runs_dir: Path, name: str) -> int:
    path = runs_dir / name
    return len(path.read_text().splitlines()) if path.exists() else 0


def publish_invoke(cloud: Cloud, rid: str, fid: str, payload: Any) -> None:
    cloud.publish(INVOKE, {"request_id": rid, "function_id": fid, "payload": payload})


def test_deployed_function_survives_kill9_and_is_restored_before_broker_returns(
    broker: Mosquitto, cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """After kill -9 the agent restores its functions from disk with no broker, then serves."""
    agent = agent_factory().start()
    wait_online(cloud)
    deploy_active(cloud, source_spec("echo", ECHO, version="4"))
    assert cloud.invoke(NODE, "echo", 1)["ok"] is True

    agent.kill9()
    broker.stop()
    mark = len(agent.log())
    agent.start()
    agent.wait_log("restored 1 deployed functions")
    status = cli_status(agent)
    functions = [(f["id"], f["state"], f["active_version"]) for f in status["functions"]]
    assert functions == [("echo", "active", "4")], status

    broker.start()  # without the retained spec: it is not redelivered, nor needed
    with fresh_cloud(broker) as cloud2:
        wait_online(cloud2)
        reply = cloud2.invoke(NODE, "echo", "after restart")
    assert reply["ok"] is True and reply["result"] == {"echo": "after restart"}, reply
    assert "deploying" not in agent.log()[mark:], agent.log()[mark:]


def test_reply_in_outbox_at_kill9_is_delivered_after_restart(
    broker: Mosquitto, cloud: Cloud, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """A reply recorded while the broker was down survives kill -9 and arrives after restart."""
    agent = agent_factory().start()
    wait_online(cloud)
    deploy_active(cloud, slowpoke(tmp_path))
    rid = f"outbox-{uuid.uuid4().hex}"
    publish_invoke(cloud, rid, "slowpoke", {"name": rid, "sleep": 1.0})
    wait_for(lambda: runs(tmp_path, rid) == 1, 10, "the invocation never started")

    broker.stop()  # the reply is produced while the agent cannot publish it
    wait_for(
        lambda: cli_status(agent)["outbox"]["messages"] >= 1,
        10,
        "the reply never reached the outbox while the broker was down",
    )
    agent.kill9()
    assert cli_status(agent)["outbox"]["messages"] >= 1, "the outbox did not survive kill -9"

    broker.start()
    with fresh_cloud(broker) as cloud2:
        agent.start()
        reply = cloud2.wait_message(REPLIES, lambda m: m["request_id"] == rid, timeout=15)
        assert reply["ok"] is True and reply["result"] == {"done": rid}, reply
        again = cloud2.invoke(NODE, "slowpoke", {"name": rid, "sleep": 1.0}, request_id=rid)
    assert again == reply, "the dedupe record should have survived kill -9 too"
    assert runs(tmp_path, rid) == 1
    wait_for(lambda: cli_status(agent)["outbox"]["messages"] == 0, 10, "the outbox never drained")


def test_invocation_cut_by_kill9_is_redelivered_and_answered_after_restart(
    cloud: Cloud, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """An invoke not yet answered at kill -9 was never acknowledged: it runs again after restart."""
    agent = agent_factory().start()
    wait_online(cloud)
    deploy_active(cloud, slowpoke(tmp_path))
    rid = f"cut-{uuid.uuid4().hex}"
    publish_invoke(cloud, rid, "slowpoke", {"name": rid, "sleep": 0.5})
    wait_for(lambda: runs(tmp_path, rid) == 1, 10, "the invocation never started")
    agent.kill9()
    agent.start()
    reply = cloud.wait_message(REPLIES, lambda m: m["request_id"] == rid, timeout=15)
    assert reply["ok"] is True, reply
    assert runs(tmp_path, rid) == 2  # at-least-once: the cut run, then the redelivered one


def test_agent_reconnects_after_broker_restart_and_serves_again(
    broker: Mosquitto, cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """After a broker restart the agent reconnects by itself, says online again, and serves."""
    agent = agent_factory().start()
    wait_online(cloud)
    deploy_active(cloud, source_spec("echo", ECHO))

    broker.restart()  # the broker keeps nothing: no retained status, no sessions
    with fresh_cloud(broker) as cloud2:
        wait_online(cloud2)  # so this one was published after the restart
        reply = cloud2.invoke(NODE, "echo", "again")
    assert reply["ok"] is True and reply["result"] == {"echo": "again"}, reply
    assert "lost the broker" in agent.log()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_invocation_queued_in_session_while_agent_was_down_is_answered(
    cloud: Cloud, agent_factory: AgentFactory, protocol: str
) -> None:
    """QoS 1 invokes sent while the agent was stopped are delivered and answered on restart."""
    agent = agent_factory(mqtt={"protocol": protocol}).start()
    wait_online(cloud)
    deploy_active(cloud, source_spec("echo", ECHO))
    agent.stop()
    cloud.wait_message(STATUS, lambda m: m["status"] == "offline")

    rid = f"queued-{uuid.uuid4().hex}"
    publish_invoke(cloud, rid, "echo", "while you were out")
    agent.start()
    reply = cloud.wait_message(REPLIES, lambda m: m["request_id"] == rid)
    assert reply["ok"] is True and reply["result"] == {"echo": "while you were out"}, reply


def test_invoke_arriving_during_shutdown_is_answered_after_restart(
    cloud: Cloud, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """An invoke that arrives while the agent drains is left unacknowledged, so it comes back."""
    agent = agent_factory().start()
    wait_online(cloud)
    deploy_active(cloud, slowpoke(tmp_path))
    deploy_active(cloud, source_spec("echo", ECHO))
    busy = f"busy-{uuid.uuid4().hex}"
    publish_invoke(cloud, busy, "slowpoke", {"name": busy, "sleep": 1.0})
    wait_for(lambda: runs(tmp_path, busy) == 1, 10, "the invocation never started")

    agent.signal(signal.SIGTERM)
    agent.wait_log("shutting down")
    late = f"late-{uuid.uuid4().hex}"
    publish_invoke(cloud, late, "echo", "late")
    cloud.wait_message(REPLIES, lambda m: m["request_id"] == busy)
    assert agent.wait_exit() == 0
    assert [m for m in cloud.on(REPLIES) if m["request_id"] == late] == []

    agent.start()
    reply = cloud.wait_message(REPLIES, lambda m: m["request_id"] == late)
    assert reply["ok"] is True and reply["result"] == {"echo": "late"}, reply


#: Records each run, then blocks until its gate file exists (the test opens the gate).
GATED = """\
import os
import time


def handler(event):
    root = os.environ['GATE_DIR']
    with open(os.path.join(root, event['name']), 'a') as runs:
        runs.write('ran\\n')
    while not os.path.exists(os.path.join(root, event['gate'])):
        time.sleep(0.01)
    return {'done': event['name']}
"""


def test_ack_of_old_connection_does_not_swallow_a_new_invoke(
    broker: Mosquitto, cloud: Cloud, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """Invokes received after a broker restart all survive kill -9, whatever finished before."""
    agent = agent_factory().start()
    wait_online(cloud)
    deploy_active(
        cloud,
        source_spec("gated", GATED, timeout_seconds=60, environment={"GATE_DIR": str(tmp_path)}),
    )
    first = f"a-{uuid.uuid4().hex}"
    publish_invoke(cloud, first, "gated", {"name": first, "gate": "gate-a"})
    wait_for(lambda: runs(tmp_path, first) == 1, 10, "the first invocation never started")

    broker.restart()  # the session (and its packet ids) is gone; numbering starts again
    with fresh_cloud(broker) as cloud2:
        wait_online(cloud2)
        later = [f"b{n}-{uuid.uuid4().hex}" for n in range(5)]
        for rid in later:
            publish_invoke(cloud2, rid, "gated", {"name": rid, "gate": "gate-b"})
        cloud2.wait_message(
            f"edge/nodes/{NODE}/heartbeat", lambda m: m.get("inflight") == 1 + len(later)
        )
        (tmp_path / "gate-a").touch()
        cloud2.wait_message(REPLIES, lambda m: m["request_id"] == first)

        agent.kill9()  # none of the later five was answered: the broker must still owe them
        (tmp_path / "gate-b").touch()
        agent.start()
        wait_for(
            lambda: settled(cloud2, later),
            15,
            "the restarted agent never answered the redelivered invokes and went idle",
        )
        answered = {m["request_id"] for m in cloud2.on(REPLIES)}
    lost = sorted(set(later) - answered)
    assert not lost, f"acknowledged to the broker but never answered: {lost}"


def settled(cloud: Cloud, rids: list[str]) -> bool:
    """All but at most one of ``rids`` answered, then a heartbeat with nothing in flight."""
    last_reply = -1
    answered = 0
    for i, (topic, payload, _) in enumerate(list(cloud.messages)):
        if not payload:
            continue
        message = json.loads(payload)
        if topic == REPLIES and message["request_id"] in rids:
            last_reply, answered = i, answered + 1
        elif (
            topic.endswith("/heartbeat")
            and i > last_reply
            and answered >= len(rids) - 1
            and message["inflight"] == 0
        ):
            return True
    return False


BIG = "def handler(event):\n    return 'x' * event\n"


def test_oversized_reply_does_not_block_the_outbox(
    agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """A broker enforcing a packet size the agent promised to respect keeps getting replies."""
    (tmp_path / "small-broker").mkdir()
    small = Mosquitto(tmp_path / "small-broker")
    small.conf.write_text(small.conf.read_text() + "max_packet_size 8192\n")
    small.start()
    cloud = Cloud(small.port)
    try:
        agent = agent_factory(port=small.port, agent={"max_payload_bytes": 4096}).start()
        wait_online(cloud)
        deploy_active(cloud, source_spec("big", BIG))
        deploy_active(cloud, source_spec("echo", ECHO))
        rid = f"big-{uuid.uuid4().hex}"
        publish_invoke(cloud, rid, "big", 100_000)
        big = cloud.wait_message(REPLIES, lambda m: m.get("request_id") == rid, timeout=5)
        assert big["ok"] is False and big["error"]["type"] == "handler_error", big
        assert "max_payload_bytes" in big["error"]["message"], big
        reply = cloud.invoke(NODE, "echo", "behind the big one", timeout=5)
        assert reply["ok"] is True, reply
        assert "lost the broker" not in agent.log(), "the broker dropped the agent for a reply"
    finally:
        cloud.close()
        small.stop()


def test_sigterm_past_grace_exits_0_and_unfinished_invoke_comes_back(
    cloud: Cloud, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """An invocation still running when the grace ends is killed, not answered, not acked:
    the agent exits 0 without leftovers and the invoke is redelivered after the restart."""
    agent = agent_factory(agent={"shutdown_grace_s": 0.5}).start()
    wait_online(cloud)
    deploy_active(
        cloud,
        source_spec("gated", GATED, timeout_seconds=60, environment={"GATE_DIR": str(tmp_path)}),
    )
    rid = f"grace-{uuid.uuid4().hex}"
    publish_invoke(cloud, rid, "gated", {"name": rid, "gate": "gate"})
    wait_for(lambda: runs(tmp_path, rid) == 1, 10, "the invocation never started")
    assert agent.proc is not None
    workers = psutil.Process(agent.proc.pid).children(recursive=True)

    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(timeout=10) == 0
    wait_for(
        lambda: not [w for w in workers if psutil.pid_exists(w.pid)],
        5,
        "a worker outlived the agent past its grace period",
    )
    assert [m for m in cloud.on(REPLIES) if m["request_id"] == rid] == []

    (tmp_path / "gate").touch()
    agent.start()
    reply = cloud.wait_message(REPLIES, lambda m: m["request_id"] == rid)
    assert reply["ok"] is True, reply
    assert runs(tmp_path, rid) == 2


#: Import blocks while MARK_DIR/hold exists, so a deployment is caught mid test-load.
SLOW_IMPORT = """\
import os
import time

open(os.path.join(os.environ['MARK_DIR'], 'importing'), 'a').close()
while os.path.exists(os.path.join(os.environ['MARK_DIR'], 'hold')):
    time.sleep(0.01)


def handler(event):
    return 'loaded'
"""


def test_deployment_interrupted_by_kill9_completes_after_restart(
    cloud: Cloud, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """kill -9 while a deployment is being test-loaded: after restart it becomes active."""
    agent = agent_factory().start()
    wait_online(cloud)
    (tmp_path / "hold").touch()
    env = {"MARK_DIR": str(tmp_path)}
    cloud.deploy(None, source_spec("slowload", SLOW_IMPORT, environment=env))
    wait_for((tmp_path / "importing").exists, 10, "the deployment never started loading")
    agent.kill9()
    (tmp_path / "hold").unlink()
    function_dir = agent.state_dir / "functions" / "slowload"
    agent.start()
    cloud.wait_message(
        f"edge/nodes/{NODE}/functions/slowload/state", lambda m: m["state"] == "active"
    )
    assert cloud.invoke(NODE, "slowload", None)["result"] == "loaded"
    leftovers = [p.name for p in function_dir.iterdir() if not p.name.startswith("1-")]
    assert leftovers == [], f"staging or trash left behind: {leftovers}"
