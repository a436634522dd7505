"""PUBACK reason codes (issue 10, item 4).

An MQTT 5 PUBACK with a failure reason code (>= 0x80, e.g. 0x87 not authorized) was counted
as a delivery: the message was deleted from the outbox and lost without a word. Now a
permanent refusal moves it to the store's dead letters (so what is queued behind it drains),
a transient one is retried with backoff and dead-lettered after ``max_refusals``, and while
dead letters exist the agent says ``degraded`` until the operator clears or retries them.

The pump's state machine is tested with a real store and a hand-written publisher and clock;
the whole path with a real Mosquitto whose ACL forbids the agent's user a reply topic.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_status, run_cli

from agent.edge.outbox import PERMANENT_REFUSALS, OutboxPump
from agent.store import MIGRATIONS, Store
from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.specs import source_spec
from testing.wait import wait_for

# -- the pump, with a real store -------------------------------------------------------------


class Publisher:
    """Records what the pump hands to MQTT; mids count up from 1."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []

    def __call__(
        self, topic: str, payload: bytes, qos: int, retain: bool, corr: bytes | None
    ) -> int:
        self.sent.append((len(self.sent) + 1, topic))
        return len(self.sent)

    def mid_of(self, topic: str) -> int:
        return [mid for mid, t in self.sent if t == topic][-1]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db") as s:
        yield s


def make_pump(store: Store, clock: Clock | None = None) -> tuple[OutboxPump, Publisher]:
    publisher = Publisher()
    pump = OutboxPump(
        store, publisher, window=8, max_refusals=5, retry_min_s=1.0, retry_max_s=8.0,
        clock=clock or Clock(),
    )  # fmt: skip
    pump.connected = True
    return pump, publisher


def queued_topics(store: Store) -> list[str]:
    return [item.topic for item in store.outbox_peek(100)]


def test_success_deletes_the_item(store: Store) -> None:
    """A PUBACK below 0x80 (0x10 no matching subscribers included) is a delivery."""
    pump, publisher = make_pump(store)
    store.outbox_put("a", b"1", kind="reply")
    store.outbox_put("b", b"2", kind="reply")
    pump.drain()
    assert pump.acknowledged(publisher.mid_of("a"), 0x00)
    assert pump.acknowledged(publisher.mid_of("b"), 0x10, "No matching subscribers")
    assert store.outbox_depth() == (0, 0) and pump.idle()
    assert store.dead_letter_counts() == (0, 0)


@pytest.mark.parametrize("code", sorted(PERMANENT_REFUSALS))
def test_puback_refusal_is_not_a_delivery_and_nothing_behind_it_is_stuck(
    store: Store, code: int
) -> None:
    """Bug: a PUBACK >= 0x80 deleted the message as delivered; now it is a dead letter
    (same transaction) and the items queued behind it still go out."""
    pump, publisher = make_pump(store)
    store.outbox_put("denied", b"x" * 10, kind="reply", correlation=b"c")
    for n in range(3):
        store.outbox_put(f"ok/{n}", b"y", kind="reply")
    pump.drain()
    assert pump.acknowledged(publisher.mid_of("denied"), code, "Not authorized")
    assert queued_topics(store) == ["ok/0", "ok/1", "ok/2"]
    assert store.outbox_depth() == (3, 3)
    for n in range(3):
        pump.acknowledged(publisher.mid_of(f"ok/{n}"))
    assert pump.idle() and pump.dead_lettered == 1
    [dead] = store.dead_letters()
    assert (dead.topic, dead.kind, dead.reason_code, dead.reason) == (
        "denied",
        "reply",
        code,
        "Not authorized",
    )
    assert dead.attempts == 1 and dead.size == 10 and dead.dead_ts > 0


def test_transient_refusal_is_retried_with_backoff(store: Store) -> None:
    """0x97 quota exceeded keeps the item and sends it again once the backoff passed."""
    clock = Clock()
    pump, publisher = make_pump(store, clock)
    store.outbox_put("busy", b"1", kind="reply")
    store.outbox_put("next", b"2", kind="reply")
    pump.drain()
    pump.acknowledged(publisher.mid_of("busy"), 0x97, "Quota exceeded")
    pump.acknowledged(publisher.mid_of("next"))
    assert queued_topics(store) == ["busy"] and not pump.idle()
    due = pump.next_retry_at()
    assert due is not None and clock.now + 1.0 <= due <= clock.now + 1.0 + 1e-9
    pump.retry_due()
    assert [t for _, t in publisher.sent].count("busy") == 1, "sent again before the backoff"
    clock.now = due
    pump.retry_due()
    assert [t for _, t in publisher.sent].count("busy") == 2
    pump.acknowledged(publisher.mid_of("busy"))
    assert pump.idle() and store.dead_letter_counts() == (0, 0)


def test_transient_refusals_end_in_the_dead_letters_after_max_refusals(store: Store) -> None:
    """After max_refusals (5) transient refusals the item is set aside as well."""
    clock = Clock()
    pump, publisher = make_pump(store, clock)
    store.outbox_put("flaky", b"1", kind="state", key="state:f", retain=True)
    pump.drain()
    for attempt in range(1, 6):
        pump.acknowledged(publisher.mid_of("flaky"), 0x80, "Unspecified error")
        due = pump.next_retry_at()
        if attempt < 5:
            assert due is not None, f"no retry after refusal {attempt}"
            clock.now = due
            pump.retry_due()
    assert pump.next_retry_at() is None and pump.idle()
    [dead] = store.dead_letters()
    assert dead.attempts == 5 and dead.reason_code == 0x80 and dead.kind == "state"


def test_retry_of_a_superseded_item_is_dropped(store: Store) -> None:
    """A refused retained state superseded by a newer one is not sent again."""
    clock = Clock()
    pump, publisher = make_pump(store, clock)
    store.outbox_put("st", b"old", kind="state", key="k", retain=True)
    pump.drain()
    pump.acknowledged(publisher.mid_of("st"), 0x97, "Quota exceeded")
    store.outbox_put("st", b"new", kind="state", key="k", retain=True)
    clock.now += 100
    pump.drain()
    pump.acknowledged(publisher.mid_of("st"))
    assert [t for _, t in publisher.sent] == ["st", "st"]  # the old once, the new once
    assert pump.idle()


def test_no_retry_while_disconnected(store: Store) -> None:
    """Offline, nothing is due (the loop must not spin on a past timer)."""
    clock = Clock()
    pump, publisher = make_pump(store, clock)
    store.outbox_put("busy", b"1", kind="reply")
    pump.drain()
    pump.acknowledged(publisher.mid_of("busy"), 0x97, "Quota exceeded")
    pump.connected = False
    clock.now += 100
    assert pump.next_retry_at() is None
    pump.retry_due()
    assert len(publisher.sent) == 1
    pump.connected = True
    pump.drain()
    assert len(publisher.sent) == 2


def test_dead_letters_clear_and_requeue(store: Store) -> None:
    """Operator actions: a retry puts them back at the end of the outbox, a clear forgets."""
    pump, publisher = make_pump(store)
    for topic in ("d1", "d2"):
        store.outbox_put(topic, b"p", kind="reply")
    pump.drain()
    for topic in ("d1", "d2"):
        pump.acknowledged(publisher.mid_of(topic), 0x87, "Not authorized")
    assert store.dead_letter_counts() == (2, 0)
    assert [d.topic for d in store.dead_letters()] == ["d2", "d1"]  # newest first
    assert store.dead_letters_request_retry() == 2
    assert store.dead_letter_counts() == (2, 2)
    assert store.dead_letters_requeue() == 2
    assert queued_topics(store) == ["d1", "d2"] and store.outbox_depth() == (2, 2)
    assert store.dead_letter_counts() == (0, 0)
    pump.drain()
    for topic in ("d1", "d2"):
        pump.acknowledged(publisher.mid_of(topic), 0x87, "Not authorized")
    assert store.dead_letters_clear() == 2 and store.dead_letter_counts() == (0, 0)
    assert store.outbox_depth() == (0, 0)


def test_dead_letter_table_is_a_new_migration(tmp_path: Path) -> None:
    """The dead-letter table comes with its own migration; older scripts are untouched."""
    assert "CREATE TABLE dead_letter" in MIGRATIONS[-1]
    assert not any("dead_letter" in script for script in MIGRATIONS[:-1])


# -- a real broker that refuses: Mosquitto with a password file and an ACL -------------------

NODE = "gw-acl"
STATUS = f"edge/nodes/{NODE}/status"
HEARTBEAT = f"edge/nodes/{NODE}/heartbeat"
ECHO = "def handler(event):\n    return {'echo': event}\n"


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """Anonymous clients (the test cloud) may do anything; the agent's user ``gw`` may use its
    own node's topics, read the fleet's, and of ``edge/app/`` write only ``edge/app/ok/``."""
    passwd = shutil.which("mosquitto_passwd") or pytest.skip("mosquitto_passwd is missing")
    password_file = tmp_path / "passwd"
    subprocess.run([passwd, "-c", "-b", str(password_file), "gw", "gw-secret"], check=True)
    acl = tmp_path / "acl"
    acl.write_text(
        "topic readwrite #\n\n"  # before any user line: anonymous clients
        "user gw\n"
        f"topic readwrite edge/nodes/{NODE}/#\n"
        "topic read edge/fleet/#\n"
        "topic write edge/app/ok/#\n"
    )
    mosq = Mosquitto(tmp_path, extra=f"password_file {password_file}\nacl_file {acl}\n").start()
    yield mosq
    mosq.stop()


def wait_new(
    cloud: Cloud, topic: str, after: int, predicate: Any, what: str, timeout: float = 15
) -> dict[str, Any]:
    """The first message on ``topic`` past the first ``after`` that satisfies ``predicate``."""

    def find() -> dict[str, Any] | None:
        return next((m for m in cloud.on(topic)[after:] if predicate(m)), None)

    return wait_for(find, timeout, what)  # type: ignore[no-any-return]


def test_reply_refused_by_broker_acl_is_a_dead_letter_and_degrades_the_node(
    tmp_path: Path, acl_broker: Mosquitto
) -> None:
    """Attack/fault: the broker refuses a reply (PUBACK 0x87). Before, the reply was dropped
    as delivered; now it is a dead letter, the next reply still goes out, the node says
    degraded (status, heartbeat, edge-agent status) until the operator clears it."""
    secret = tmp_path / "gw.password"
    secret.write_text("gw-secret\n")
    agent = AgentProcess(
        tmp_path,
        acl_broker.port,
        NODE,
        mqtt={"username": "gw", "password_file": str(secret), "reply_prefixes": ["edge/app/"]},
    ).start()
    cloud = Cloud(acl_broker.port)
    try:
        cloud.wait_message(STATUS, lambda m: m["status"] == "online", timeout=20)
        cloud.deploy(NODE, source_spec("echo", ECHO))
        cloud.wait_message(
            f"edge/nodes/{NODE}/functions/echo/state", lambda m: m["state"] == "active"
        )
        seen = len(cloud.on(STATUS))
        denied = f"edge/app/denied/{uuid.uuid4().hex}"
        refused_rid = uuid.uuid4().hex
        cloud.publish(
            f"edge/nodes/{NODE}/invoke",
            {"request_id": refused_rid, "function_id": "echo", "payload": 1, "reply_to": denied},
        )
        status = wait_new(
            cloud, STATUS, seen, lambda m: m["status"] == "degraded",
            "the agent never published a degraded status after the broker refused its reply",
        )  # fmt: skip
        assert status["dead_letters"] == 1
        assert any(denied in why for why in status["degraded"]), status

        # Nothing stuck behind it: a reply to an allowed topic is delivered.
        allowed = f"edge/app/ok/{uuid.uuid4().hex}"
        reply = cloud.invoke(NODE, "echo", 2, reply_to=allowed, timeout=15)
        assert reply["ok"] is True and reply["result"] == {"echo": 2}
        assert cloud.on(denied) == [], "the broker delivered a reply it refused"
        beat = wait_new(
            cloud, HEARTBEAT, 0, lambda m: m.get("dead_letters") == 1,
            "no heartbeat counted the dead letter",
        )  # fmt: skip
        assert beat["status"] == "degraded" and beat["degraded"], beat
        agent.wait_log(
            f"WARNING agent.edge.outbox: the broker refused the reply message to {denied}: "
            "Not authorized (0x87)"
        )

        # The operator sees it with edge-agent status ...
        shown = run_cli("status", "--config", str(agent.config_path))
        assert shown.returncode == 0, shown.stderr
        assert "dead letters: 1" in shown.stdout, shown.stdout
        assert denied in shown.stdout and "Not authorized" in shown.stdout, shown.stdout
        as_json = cli_status(agent)["dead_letters"]
        assert as_json["count"] == 1
        [newest] = as_json["newest"]
        assert (newest["topic"], newest["kind"], newest["reason_code"]) == (denied, "reply", 0x87)
        assert newest["ts"].endswith("Z")

        # ... retries it (still refused: it comes back as a dead letter) ...
        retried = run_cli("status", "--retry-dead-letters", "--config", str(agent.config_path))
        assert retried.returncode == 0 and "marked 1" in retried.stderr, retried.stderr
        wait_for(
            lambda: agent.log().count(f"refused the reply message to {denied}") >= 2,
            15,
            "the agent did not send the dead letter again after --retry-dead-letters",
        )
        wait_for(
            lambda: cli_status(agent)["dead_letters"]["count"] == 1,
            15,
            "the retried message did not come back as a dead letter",
        )

        # ... and clears it: the agent is online again.
        seen = len(cloud.on(STATUS))
        cleared = run_cli("status", "--clear-dead-letters", "--config", str(agent.config_path))
        assert cleared.returncode == 0 and "cleared 1" in cleared.stderr, cleared.stderr
        status = wait_new(
            cloud, STATUS, seen, lambda m: m["status"] == "online",
            "the agent did not say online again after its dead letters were cleared",
        )  # fmt: skip
        assert status["dead_letters"] == 0 and "degraded" not in status
        beats = len(cloud.on(HEARTBEAT))
        beat = wait_new(cloud, HEARTBEAT, beats, lambda m: True, "no heartbeat after the clear")
        assert beat["status"] == "online" and beat["dead_letters"] == 0, beat
    finally:
        cloud.close()
        agent.stop()
