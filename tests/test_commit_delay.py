"""Group commit under load (``agent.commit_delay_ms``, issue 15): while calls wait behind
running ones, a finished invocation's reply waits a little for others, so one transaction
carries several replies; a call answered alone never waits. Real broker, real agent, real
workers; what shared a transaction is read back from the agent's store (the replies of one
group commit share the dedupe row's ``ts``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.specs import source_spec
from testing.wait import wait_for

# The burst's first call takes a while, so the others are delivered and queued behind it
# (the broker holds back what it cannot have in flight) however slow the machine is.
ECHO = """\
import time


def handler(event):
    if event == 0:
        time.sleep(1)
    return {'echo': event}
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path_factory.mktemp("commit")).start()
    yield b
    b.stop()


@contextlib.contextmanager
def serving(
    tmp_path: Path, broker: Mosquitto, delay_ms: float
) -> Iterator[tuple[AgentProcess, Cloud]]:
    """An agent with ``commit_delay_ms`` = ``delay_ms`` serving ``echo`` (concurrency 1: one
    answer at a time, so every group beyond one reply is the delay's doing), warm. Each has
    a node id of its own: the broker keeps the retained states of the one before."""
    node = f"gw-commit-{uuid.uuid4().hex[:6]}"
    agent = AgentProcess(
        tmp_path, broker.port, node,
        agent={"commit_delay_ms": delay_ms},
        runtime={"function_uids": "", "max_workers": 2, "max_queue": 200},
    ).start()  # fmt: skip
    cloud = Cloud(broker.port)
    try:
        cloud.wait_message(f"edge/nodes/{node}/status", lambda m: m["status"] == "online")
        cloud.deploy(node, source_spec("echo", ECHO, concurrency=1))
        cloud.wait_message(
            f"edge/nodes/{node}/functions/echo/state", lambda m: m["state"] == "active", 20
        )
        warm = cloud.invoke(node, "echo", "warm")
        assert warm["ok"] is True, warm
        yield agent, cloud
    finally:
        cloud.close()
        agent.stop()


def burst(agent: AgentProcess, cloud: Cloud, n: int) -> list[str]:
    """``n`` invokes published at once; every one answered once, with its own result."""
    rids = [f"c-{i}-{uuid.uuid4().hex[:8]}" for i in range(n)]
    for i, rid in enumerate(rids):
        invoke = {"request_id": rid, "function_id": "echo", "payload": i}
        cloud.publish(f"edge/nodes/{agent.node_id}/invoke", invoke)

    def answered() -> dict[str, list[dict[str, Any]]]:
        got: dict[str, list[dict[str, Any]]] = {}
        for m in cloud.on(f"edge/nodes/{agent.node_id}/replies"):
            if m.get("request_id") in rids:
                got.setdefault(m["request_id"], []).append(m)
        return got

    wait_for(lambda: len(answered()) == n, 30, f"not all {n} invokes of the burst answered")
    for i, rid in enumerate(rids):
        [reply] = answered()[rid]
        assert reply["ok"] is True and reply["result"] == {"echo": i}, reply
    return rids


def commits_of(agent: AgentProcess, rids: list[str]) -> int:
    """How many transactions wrote these requests' replies (one ``ts`` per group commit)."""
    db = agent.state_dir / "state.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        marks = ",".join("?" * len(rids))
        rows = conn.execute(
            f"SELECT request_id, ts FROM dedupe WHERE request_id IN ({marks})", rids
        ).fetchall()
    assert len(rows) == len(rids), "a reply was not remembered for dedupe"
    return len({ts for _, ts in rows})


def test_a_burst_shares_transactions_when_calls_wait(tmp_path: Path, broker: Mosquitto) -> None:
    """40 invokes of a function that runs one at a time: with the delay, the replies of
    answers that came within it share a transaction; without it, each has its own."""
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    with serving(tmp_path / "on", broker, 200.0) as (agent, cloud):
        grouped = commits_of(agent, burst(agent, cloud, 40))
    with serving(tmp_path / "off", broker, 0.0) as (agent, cloud):
        alone = commits_of(agent, burst(agent, cloud, 40))
    print(f"transactions for 40 replies: {grouped} with a 200 ms delay, {alone} without")
    assert alone == 40, "without the delay, one answer at a time must mean one commit each"
    assert grouped <= 20, f"the delay grouped nothing: {grouped} transactions for 40 replies"


def test_a_call_answered_alone_is_not_held_for_the_delay(tmp_path: Path, broker: Mosquitto) -> None:
    """Nothing waits behind it: its reply goes at once, however long the delay is (5 s
    here; each round trip must come back in well under that)."""
    with serving(tmp_path, broker, 5000.0) as (agent, cloud):
        for n in range(5):
            started = time.monotonic()
            reply = cloud.invoke(agent.node_id, "echo", n, timeout=10)
            took = time.monotonic() - started
            assert reply["result"] == {"echo": n}
            assert took < 2.5, f"a call alone waited {took:.1f}s: held for the commit delay"


SLOW = """\
import time


def handler(event):
    if event == 'slow':
        time.sleep(30)
    if event == 'first':
        time.sleep(0.3)  # the others arrive meanwhile: two run, two wait
    return event
"""


def test_a_call_past_its_deadline_is_not_held_for_the_delay(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """While the loop waits for more answers (x answered, b started in its place, c waits
    behind a and b), a running call reaches its deadline (1 s): it is answered timeout
    then, not when the 5 s delay is over."""
    with serving(tmp_path, broker, 5000.0) as (agent, cloud):
        cloud.deploy(agent.node_id, source_spec("mix", SLOW, concurrency=2, timeout_seconds=1))
        cloud.wait_message(
            f"edge/nodes/{agent.node_id}/functions/mix/state",
            lambda m: m["state"] == "active",
            20,
        )
        assert cloud.invoke(agent.node_id, "mix", "warm")["ok"] is True
        topic = f"edge/nodes/{agent.node_id}/invoke"
        rids = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in ("x", "a", "b", "c")}
        started = time.monotonic()
        for name, event in (("x", "first"), ("a", "slow"), ("b", "slow"), ("c", "fast")):
            cloud.publish(topic, {"request_id": rids[name], "function_id": "mix", "payload": event})
        replies = f"edge/nodes/{agent.node_id}/replies"
        for name in ("a", "b"):
            reply = cloud.wait_message(
                replies, lambda m, n=name: m.get("request_id") == rids[n], 15
            )
            took = time.monotonic() - started
            assert reply["ok"] is False and reply["error"]["type"] == "timeout", reply
            assert took < 4.0, f"{name} answered {took:.1f}s after it was sent: held for the delay"
        reply = cloud.wait_message(replies, lambda m: m.get("request_id") == rids["c"], 15)
        assert reply["ok"] is True and reply["result"] == "fast", reply
