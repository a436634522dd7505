"""The daemon's loop (``agent.edge.loop.Agent``) driven in-process: no broker, no worker
process, no sleep. A fake MQTT client, a fake clock and a fake pool (``testing.fakes``) stand
in for paho, ``time.monotonic`` and the worker processes; the store is a real SQLite file.

Each test posts events as paho's thread would (``FakeMqttClient.deliver`` / ``connect`` /
``puback``) and steps the loop (``Agent.run_until_idle``), then checks the state the loop
moved to: what it published, what sits in the outbox, what it acknowledged. The deployer's
threads are real (they install the code), so a deployment is waited for with a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.contract import protocol
from agent.edge.loop import ACK_LINGER_S, Agent
from agent.edge.store_faults import STORE_RETRY_S
from agent.edge.systemd import Notifier
from agent.errors import MqttError, StoreError
from agent.exec.pool import ContextInput
from agent.store import StateTooLarge, Store
from agent.store.accepted import AcceptedInvokes
from testing.fakes import (
    FakeClock,
    FakeMqttClient,
    FakePool,
    HeldExecutor,
    InlineExecutor,
    Writes,
)
from testing.specs import source_spec

NODE = "gw-inproc"
HEARTBEAT_S = 5.0


@dataclass
class Loop:
    agent: Agent
    mqtt: FakeMqttClient
    pool: FakePool
    clock: FakeClock
    store: Store

    @property
    def topics(self) -> protocol.Topics:
        return self.agent.topics

    def drive(self, predicate: Callable[[], Any], message: str, timeout: float = 10.0) -> Any:
        """Step the loop until ``predicate`` holds (threads such as the deployer's may post
        later): a real-time deadline, never a sleep."""
        deadline = time.monotonic() + timeout
        while True:
            self.agent.run_until_idle()
            found = predicate()
            if found:
                return found
            if time.monotonic() > deadline:
                pytest.fail(f"{message} within {timeout}s")
            self.agent.step(0.05)  # blocks on the event queue: wakes as soon as one is posted

    def deploy(self, fid: str, concurrency: int = 2) -> None:
        """Deploy an echo function; ``concurrency`` 2 (as max_workers): two invocations of
        it start together, so they finish in one loop step (one group commit)."""
        spec = source_spec(
            fid, "def handler(payload):\n    return payload\n", concurrency=concurrency
        )
        self.mqtt.deliver(self.topics.fleet_function(fid), spec, retain=True)
        self.drive(lambda: self.state_of(fid) == "active", f"{fid} not active")

    def state_of(self, fid: str) -> str | None:
        states = self.mqtt.json_on(self.topics.function_state(fid))
        return states[-1]["state"] if states else None

    def invoke(self, fid: str, payload: Any, rid: str | None = None) -> str:
        rid = rid or uuid.uuid4().hex
        self.mqtt.deliver(self.topics.invoke, protocol.encode_invoke(rid, fid, payload))
        return rid

    def replies(self) -> list[dict[str, Any]]:
        return [json.loads(s.payload) for s in self.mqtt.on(self.topics.replies)]

    def outbox_kinds(self) -> list[str]:
        return [item.kind for item in self.store.outbox_peek(100)]

    def settle(self) -> None:
        """Every PUBACK for what was sent so far, handled, and their rows' linger over (no
        group commit took them): an empty outbox."""
        self.mqtt.puback_all()
        self.agent.run_until_idle()
        self.clock.advance(ACK_LINGER_S)
        self.agent.run_until_idle()
        assert self.store.outbox_depth()[0] == 0, self.outbox_kinds()


def _handlers() -> dict[str, Any]:
    def remember_mode(payload: Any, context: ContextInput) -> Writes:
        mode = context.desired.get("mode")
        return Writes({"mode": mode}, {"seen": mode})

    return {"stateful": remember_mode}


@contextlib.contextmanager
def started_loop(
    tmp_path: Path, executor: Executor | None = None, **agent_settings: Any
) -> Iterator[Loop]:
    """A booted, connected loop; ``agent_settings`` go into ``[agent]``."""
    state_dir = tmp_path / "state"
    config = parse_config(
        {
            "node": {"id": NODE, "capabilities": ["python"]},
            "agent": {
                "state_dir": str(state_dir),
                "heartbeat_interval_s": HEARTBEAT_S,
                **agent_settings,
            },
            "runtime": {"function_uids": "", "max_workers": 2},
        }
    )
    store = Store(state_dir / "state.db")
    pool = FakePool(_handlers())
    clock = FakeClock()
    agent = Agent(
        config,
        store=store,
        pool=pool,
        notifier=Notifier(None),
        clock=clock,
        executor=executor or InlineExecutor(),
    )
    client = FakeMqttClient(sink=agent.post)
    agent.mqtt = client
    agent.boot()
    client.connect(session_present=False)
    agent.run_until_idle()
    yield Loop(agent, client, pool, clock, store)
    client.disconnect()  # nothing left to drain: the stop does not wait out the grace
    agent.request_stop()
    agent.run_until_idle()
    assert agent.stopping
    assert agent.shutdown() == 0
    assert pool.closed and client.stopped


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    with started_loop(tmp_path) as started:
        yield started


def test_a_retained_spec_is_deployed_and_its_active_state_published(loop: Loop) -> None:
    assert loop.pool.functions() == []
    spec_topic = loop.topics.fleet_function("echo")
    loop.deploy("echo")
    assert loop.pool.functions() == ["echo"]
    assert [c.function_id for c in loop.pool.loads] == ["echo"]  # test-loaded once
    state = loop.mqtt.json_on(loop.topics.function_state("echo"))[-1]
    assert (state["state"], state["version"]) == ("active", "1")
    sent = loop.mqtt.on(loop.topics.function_state("echo"))[-1]
    assert sent.retain and sent.qos == 1
    assert any(m.topic == spec_topic for m in loop.mqtt.acked)  # once stored
    assert loop.store.get_deployment("echo") is not None


def test_a_reply_is_durable_in_the_outbox_until_its_puback(loop: Loop) -> None:
    loop.deploy("echo")
    loop.settle()
    rid = loop.invoke("echo", {"n": 1})
    loop.agent.run_until_idle()
    [reply] = loop.replies()
    assert (reply["request_id"], reply["ok"], reply["result"]) == (rid, True, {"n": 1})
    assert loop.outbox_kinds() == ["reply"]  # handed to MQTT, still kept
    [sent] = loop.mqtt.on(loop.topics.replies)
    assert sent.mid in loop.mqtt.unacked
    assert any(m.topic == loop.topics.invoke for m in loop.mqtt.acked)
    loop.mqtt.puback(sent.mid)
    loop.agent.run_until_idle()
    assert loop.outbox_kinds() == ["reply"]  # delivered: deleted with the next group commit
    loop.clock.advance(ACK_LINGER_S)  # none came within the linger: deleted on its own
    loop.agent.run_until_idle()
    assert loop.outbox_kinds() == []
    assert loop.agent.store.dedupe_get(rid) is not None  # remembered for duplicates


def test_a_delivered_reply_is_deleted_in_the_next_group_commit(
    loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load a PUBACK costs no transaction of its own: the row of a delivered reply
    goes in the transaction that queues the next replies, and the depth stays exact."""
    loop.deploy("echo")
    loop.settle()
    first = loop.invoke("echo", 1)
    loop.agent.run_until_idle()
    loop.mqtt.puback_all()
    loop.agent.run_until_idle()
    assert loop.store.outbox_depth()[0] == 1 and loop.store.outbox_acks_noted() == 1
    flushed: list[int] = []
    flush = loop.store.outbox_flush_acked
    monkeypatch.setattr(loop.store, "outbox_flush_acked", lambda: flushed.append(flush()) or 0)
    second = loop.invoke("echo", 2)
    loop.agent.run_until_idle()
    assert [r["request_id"] for r in loop.replies()] == [first, second]
    assert loop.store.outbox_acks_noted() == 0  # taken by the second reply's transaction
    [item] = loop.store.outbox_peek(10)
    assert loop.store.outbox_depth() == (1, len(item.payload))
    assert json.loads(item.payload)["request_id"] == second
    loop.clock.advance(ACK_LINGER_S)
    loop.agent.run_until_idle()
    assert flushed in ([], [0])  # nothing was left for a transaction of its own
    loop.settle()
    assert loop.store.outbox_depth() == (0, 0)


def test_invokes_answered_while_offline_wait_in_the_outbox_and_drain_in_order(
    loop: Loop,
) -> None:
    loop.deploy("echo")
    loop.settle()
    loop.mqtt.disconnect()
    rids = [loop.invoke("echo", n) for n in range(3)]
    loop.agent.run_until_idle()
    assert loop.replies() == []  # nothing published while offline
    assert loop.outbox_kinds() == ["reply"] * 3
    assert [call[1] for call in loop.pool.calls] == [0, 1, 2]  # answered all the same
    loop.mqtt.connect()
    loop.agent.run_until_idle()
    assert [r["request_id"] for r in loop.replies()] == rids  # in the order answered
    assert [r["result"] for r in loop.replies()] == [0, 1, 2]
    loop.settle()


def test_desired_state_is_applied_and_a_state_write_queues_a_delta(loop: Loop) -> None:
    loop.deploy("stateful")
    loop.settle()
    desired = protocol.encode_sync_desired(4, {"mode": "eco"})
    loop.mqtt.deliver(loop.topics.sync_desired, desired, retain=True)
    loop.agent.run_until_idle()
    assert loop.agent.sync.current().desired_version == 4
    assert loop.mqtt.json_on(loop.topics.status)[-1]["sync"]["desired_version"] == 4
    rid = loop.invoke("stateful", None)
    loop.agent.run_until_idle()
    [reply] = loop.replies()
    assert (reply["request_id"], reply["result"]) == (rid, {"mode": "eco"})  # read desired
    assert "sync_delta" in loop.outbox_kinds()  # queued with the reply, held to linger
    assert loop.mqtt.on(loop.topics.sync_delta) == []
    loop.clock.advance(1.0)  # past outbox.delta_linger_ms on the loop's clock
    loop.agent.step()
    [delta] = loop.mqtt.json_on(loop.topics.sync_delta)
    assert (delta["from_version"], delta["to_version"], delta["changes"]) == (0, 1, {"seen": "eco"})
    loop.settle()


def test_the_heartbeat_fires_when_the_clock_advances(loop: Loop) -> None:
    beats = loop.mqtt.json_on(loop.topics.heartbeat)
    assert len(beats) == 1  # at the connect
    loop.clock.advance(HEARTBEAT_S - 0.5)
    loop.agent.step()
    assert len(loop.mqtt.json_on(loop.topics.heartbeat)) == 1  # not due yet
    statuses = len(loop.mqtt.on(loop.topics.status))
    loop.clock.advance(1.0)
    loop.agent.step()
    beats = loop.mqtt.json_on(loop.topics.heartbeat)
    assert [b["seq"] for b in beats] == [1, 2]
    assert beats[-1]["uptime_s"] == pytest.approx(HEARTBEAT_S + 0.5)  # the fake clock's
    assert len(loop.mqtt.on(loop.topics.status)) == statuses  # refreshed every 3rd only
    loop.clock.advance(HEARTBEAT_S)
    loop.agent.step()
    assert len(loop.mqtt.json_on(loop.topics.heartbeat)) == 3
    assert len(loop.mqtt.on(loop.topics.status)) == statuses + 1


def test_a_bad_invoke_is_answered_bad_request_and_the_loop_keeps_serving(loop: Loop) -> None:
    loop.deploy("echo")
    loop.settle()
    loop.mqtt.deliver(loop.topics.invoke, b"{not json")
    loop.agent.run_until_idle()
    [bad] = loop.replies()
    assert (bad["ok"], bad["error"]["type"]) == (False, "bad_request")
    assert loop.pool.calls == []  # never ran
    assert loop.outbox_kinds() == ["reply"]  # answered durably, like any reply
    rid = loop.invoke("echo", "still here")
    loop.agent.run_until_idle()
    ok = loop.replies()[-1]
    assert (ok["request_id"], ok["ok"], ok["result"]) == (rid, True, "still here")
    loop.settle()


def test_a_duplicate_request_gets_the_remembered_reply_without_running_again(
    loop: Loop,
) -> None:
    loop.deploy("echo")
    loop.settle()
    rid = loop.invoke("echo", "once")
    loop.agent.run_until_idle()
    loop.settle()
    loop.invoke("echo", "once", rid=rid)
    loop.agent.run_until_idle()
    assert [r["request_id"] for r in loop.replies()] == [rid, rid]
    assert loop.replies()[0] == loop.replies()[1]  # the same bytes, not a second run
    assert len(loop.pool.calls) == 1
    loop.settle()


def test_an_invoke_for_a_function_not_deployed_is_answered_and_not_remembered(
    loop: Loop,
) -> None:
    rid = loop.invoke("missing", 1)
    loop.agent.run_until_idle()
    [reply] = loop.replies()
    assert (reply["request_id"], reply["error"]["type"]) == (rid, "function_not_found")
    assert loop.store.dedupe_get(rid) is None  # a retry after the deploy runs it
    loop.settle()


def test_a_failing_store_degrades_the_node_until_the_retry_timer_finds_it_writable(
    loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop.deploy("echo")
    loop.settle()

    def disk_full(*args: Any, **kwargs: Any) -> int:
        raise StoreError("database or disk is full") from OSError(errno.ENOSPC, "No space")

    monkeypatch.setattr(loop.store, "record_reply", disk_full)
    monkeypatch.setattr(loop.store, "record_replies", disk_full)  # the group commit's write
    rid = loop.invoke("echo", "anyway")
    loop.agent.run_until_idle()
    [reply] = loop.replies()
    assert (reply["request_id"], reply["result"]) == (rid, "anyway")  # published directly
    assert loop.outbox_kinds() == []
    status = loop.mqtt.json_on(loop.topics.status)[-1]
    assert status["status"] == "degraded" and "disk full" in status["degraded"][0]
    monkeypatch.undo()  # the disk has room again; the probe finds out on its timer
    loop.clock.advance(STORE_RETRY_S / 2)
    loop.agent.step()
    assert loop.mqtt.json_on(loop.topics.status)[-1]["status"] == "degraded"
    loop.clock.advance(STORE_RETRY_S)
    loop.agent.step()
    assert loop.mqtt.json_on(loop.topics.status)[-1]["status"] == "online"
    loop.settle()


@pytest.mark.parametrize("record_after_s", [0.0, 1.0], ids=["recorded-at-once", "fast"])
def test_a_run_of_finished_invocations_is_answered_in_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_after_s: float
) -> None:
    """Group commit (issue 15): the replies of invocations that finished together, their
    dedupe rows and the deletes of their accepted records (when they were put on record:
    ``record_accepted_after_s`` 0) go in ONE transaction, before any reply is handed to the
    client; then a run of PUBACKs is noted, and deleted in one more transaction when no
    group commit took it within its linger."""
    with started_loop(tmp_path, record_accepted_after_s=record_after_s) as loop:
        _answered_in_one_transaction(loop, monkeypatch, deletes=2 if record_after_s == 0 else 0)


def _answered_in_one_transaction(
    loop: Loop, monkeypatch: pytest.MonkeyPatch, *, deletes: int
) -> None:
    loop.deploy("echo")
    loop.settle()
    groups: list[tuple[list[str | None], int, int]] = []
    record_replies = loop.store.record_replies

    def spy(replies: Any, **kwargs: Any) -> list[int | None]:
        handed = len(loop.mqtt.on(loop.topics.replies))
        groups.append(([r[0] for r in replies], handed, len(kwargs.get("also", ()))))
        return record_replies(replies, **kwargs)

    monkeypatch.setattr(loop.store, "record_replies", spy)
    rids = [loop.invoke("echo", n) for n in range(2)]  # concurrency 2: both run at once
    loop.agent.run_until_idle()
    assert groups == [(rids, 0, deletes)]  # one transaction, nothing handed to MQTT before it
    assert [r["request_id"] for r in loop.replies()] == rids
    assert all(loop.store.dedupe_get(rid) is not None for rid in rids)
    assert loop.agent.accepted.pending() == []  # deleted in the replies' transaction
    invokes = [m for m in loop.mqtt.acked if m.topic == loop.topics.invoke]
    assert len(invokes) == 2
    # One wake-up of the client's network thread per batch: every reply handed over inside
    # the loop's cork (the group's batch), as were the acks.
    assert all(sent.corked for sent in loop.mqtt.on(loop.topics.replies))
    assert loop.mqtt.acked_corked >= 2 and not loop.mqtt.corked_now
    assert loop.outbox_kinds() == ["reply", "reply"]

    noted: list[list[int]] = []
    flushed: list[int] = []
    single: list[int] = []
    later, flush, ack = (
        loop.store.outbox_ack_later, loop.store.outbox_flush_acked, loop.store.outbox_ack
    )  # fmt: skip
    monkeypatch.setattr(
        loop.store, "outbox_ack_later", lambda ids: noted.append(list(ids)) or later(ids)
    )
    monkeypatch.setattr(loop.store, "outbox_flush_acked", lambda: flushed.append(flush()) or 0)
    monkeypatch.setattr(loop.store, "outbox_ack", lambda i: single.append(i) or ack(i))
    assert len(loop.mqtt.puback_all()) == 2
    loop.agent.run_until_idle()
    assert [len(ids) for ids in noted] == [2] and single == []  # one note for the run
    assert loop.outbox_kinds() == ["reply", "reply"]  # no group commit came: they linger
    loop.clock.advance(ACK_LINGER_S)
    loop.agent.run_until_idle()
    assert flushed == [2]  # then one delete for the run
    assert loop.outbox_kinds() == []


def test_a_reply_that_does_not_fit_is_refused_alone_and_published_directly(
    loop: Loop,
) -> None:
    loop.deploy("echo")
    loop.settle()
    loop.store.set_limits(max_messages=1)  # room for one reply: both invokes are admitted
    rids = [loop.invoke("echo", n) for n in range(2)]
    loop.agent.run_until_idle()
    assert sorted(r["request_id"] for r in loop.replies()) == sorted(rids)  # both answered
    assert loop.outbox_kinds() == ["reply"]  # the first is durable, the second went direct
    assert loop.store.dedupe_get(rids[0]) is not None
    assert loop.store.dedupe_get(rids[1]) is None  # not remembered: a retry runs again
    assert loop.agent.accepted.pending() == []
    loop.store.set_limits(max_messages=10_000)
    loop.settle()


def test_a_group_commit_that_fails_answers_each_reply_on_its_own(
    loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's transaction fails (rolled back): every reply takes the one-by-one path,
    durable all the same, its accepted record deleted; a store that writes again is no
    fault (the node stays online)."""
    loop.deploy("echo")
    loop.settle()

    def locked(*args: Any, **kwargs: Any) -> list[int | None]:
        raise StoreError("record_replies failed: database is locked")

    monkeypatch.setattr(loop.store, "record_replies", locked)
    rids = [loop.invoke("echo", n) for n in range(2)]
    loop.agent.run_until_idle()
    assert [r["request_id"] for r in loop.replies()] == rids
    assert loop.outbox_kinds() == ["reply", "reply"]  # queued one by one (record_reply)
    assert all(loop.store.dedupe_get(rid) is not None for rid in rids)
    assert loop.agent.accepted.pending() == []
    assert loop.mqtt.json_on(loop.topics.status)[-1]["status"] == "online"
    loop.settle()


@pytest.mark.parametrize("record_after_s", [0.0, 1.0], ids=["recorded-at-once", "fast"])
def test_a_fallback_reply_that_fails_fails_its_invocation_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_after_s: float
) -> None:
    """The group commit failed and one reply of the run also fails on its own: that one is
    logged and left as a single event's would be (no reply; on record as accepted it stays
    there to run again after a restart, else it stays unacknowledged for the broker to
    deliver again); the rest of the run is answered."""
    with started_loop(tmp_path, record_accepted_after_s=record_after_s) as loop:
        _fallback_reply_fails(loop, monkeypatch, recorded=record_after_s == 0)


def _fallback_reply_fails(loop: Loop, monkeypatch: pytest.MonkeyPatch, *, recorded: bool) -> None:
    loop.deploy("echo")
    loop.settle()
    bad, good = "rid-bad", "rid-good"

    def locked(*args: Any, **kwargs: Any) -> list[int | None]:
        raise StoreError("record_replies failed: database is locked")

    record_reply = loop.store.record_reply

    def refuse_bad(rid: str, *args: Any, **kwargs: Any) -> int:
        if rid == bad:
            raise StateTooLarge("refused by the test")  # a StoreError that is no fault
        return record_reply(rid, *args, **kwargs)

    monkeypatch.setattr(loop.store, "record_replies", locked)
    monkeypatch.setattr(loop.store, "record_reply", refuse_bad)
    loop.invoke("echo", 0, rid=bad)
    loop.invoke("echo", 1, rid=good)
    loop.agent.run_until_idle()
    assert [r["request_id"] for r in loop.replies()] == [good]
    assert loop.store.dedupe_get(good) is not None and loop.store.dedupe_get(bad) is None
    invokes = [m for m in loop.mqtt.acked if m.topic == loop.topics.invoke]
    acked = [json.loads(m.payload)["request_id"] for m in invokes]
    if recorded:
        assert [p.request_id for p in loop.agent.accepted.pending()] == [bad]
        assert sorted(acked) == sorted([bad, good])  # acknowledged when put on record
    else:
        assert loop.agent.accepted.pending() == []
        assert acked == [good]  # the broker delivers the failed one again
    assert loop.mqtt.json_on(loop.topics.status)[-1]["status"] == "online"
    loop.settle()


def test_an_ack_that_fails_in_a_committed_run_leaves_the_rest_acknowledged(
    loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's replies were committed together, then the ack of the first one raised: the
    rest of the run went unacknowledged, holding the broker's in-flight window (mosquitto
    stops delivering at 20) until the next reconnect."""
    loop.deploy("echo")
    loop.settle()
    first, second = "rid-first", "rid-second"
    ack = loop.mqtt.ack

    def ack_fails_for_first(msg: Any) -> None:
        if msg.topic == loop.topics.invoke and json.loads(msg.payload)["request_id"] == first:
            raise MqttError("ack refused by the test")
        ack(msg)

    monkeypatch.setattr(loop.mqtt, "ack", ack_fails_for_first)
    loop.invoke("echo", 0, rid=first)
    loop.invoke("echo", 1, rid=second)  # max_workers 2: both finish in one run
    loop.agent.run_until_idle()
    assert sorted(r["request_id"] for r in loop.replies()) == [first, second]
    acked = [
        json.loads(m.payload)["request_id"]
        for m in loop.mqtt.acked
        if m.topic == loop.topics.invoke
    ]
    assert second in acked and first not in acked, acked
    assert loop.mqtt.json_on(loop.topics.status)[-1]["status"] == "online"
    loop.settle()


def test_a_direct_reply_that_fails_to_publish_does_not_stall_the_committed_run(
    loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox had room for one reply of a run; the other's direct publish raised after
    the group was committed, and the error escaped: no request of the run was acknowledged."""
    loop.deploy("echo")
    loop.settle()
    loop.store.set_limits(max_messages=1)
    publish = loop.mqtt.publish
    refused: list[str] = []

    def publish_fails_for_replies(topic: str, payload: bytes, **kwargs: Any) -> int:
        # The drain publishes the durable reply later; the direct one comes first.
        if topic == loop.topics.replies and not refused:
            refused.append(json.loads(payload)["request_id"])
            raise MqttError("publish refused by the test")
        return publish(topic, payload, **kwargs)

    monkeypatch.setattr(loop.mqtt, "publish", publish_fails_for_replies)
    rids = [loop.invoke("echo", n) for n in range(2)]
    loop.agent.run_until_idle()
    acked = [
        json.loads(m.payload)["request_id"]
        for m in loop.mqtt.acked
        if m.topic == loop.topics.invoke
    ]
    assert sorted(acked) == sorted(rids), acked  # both acknowledged: nothing holds the window
    assert refused == [rids[1]]  # the one without room, lost and logged
    assert [r["request_id"] for r in loop.replies()] == [rids[0]]  # the durable one went out
    loop.store.set_limits(max_messages=10_000)
    loop.settle()


def test_a_fast_invocation_is_acknowledged_with_its_reply_and_never_put_on_record(
    loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: an invocation answered before ``record_accepted_after_s`` costs no write of
    its own. It is acknowledged once its reply is durable, and no accepted record is ever
    written for it (the reply's transaction is the only one)."""
    loop.deploy("echo")
    loop.settle()
    puts: list[list[str]] = []
    put_many = AcceptedInvokes.put_many

    def spy(self: AcceptedInvokes, records: Any) -> None:
        puts.append([r.request_id for r in records])
        put_many(self, records)

    monkeypatch.setattr(AcceptedInvokes, "put_many", spy)
    rid = loop.invoke("echo", 7)
    loop.agent.run_until_idle()
    assert [r["request_id"] for r in loop.replies()] == [rid]
    assert [m.topic for m in loop.mqtt.acked].count(loop.topics.invoke) == 1
    loop.clock.advance(5.0)  # long past its due time: answered, so nothing to record
    loop.agent.run_until_idle()
    assert puts == [] and loop.agent.accepted.pending() == []
    assert [m.topic for m in loop.mqtt.acked].count(loop.topics.invoke) == 1
    loop.settle()


def test_an_invocation_still_running_when_due_is_put_on_record_and_acknowledged(
    tmp_path: Path,
) -> None:
    """Issue 13 kept under issue 15's lazy record: one still running
    ``record_accepted_after_s`` after it was accepted goes on record (all that are due, in
    one transaction) and is acknowledged then, not at acceptance and not a second time with
    its reply; its record goes in the reply's transaction."""
    executor = HeldExecutor()
    with started_loop(tmp_path, executor, record_accepted_after_s=1.0) as loop:
        loop.deploy("echo")
        loop.settle()
        rids = [loop.invoke("echo", n) for n in range(2)]
        loop.agent.run_until_idle()

        def acked() -> list[str]:
            return [
                json.loads(m.payload)["request_id"]
                for m in loop.mqtt.acked
                if m.topic == loop.topics.invoke
            ]

        assert acked() == [] and loop.agent.accepted.pending() == []
        loop.clock.advance(0.9)
        loop.agent.run_until_idle()
        assert acked() == [] and loop.agent.accepted.pending() == [], "recorded before due"
        loop.clock.advance(0.2)
        loop.agent.run_until_idle()
        assert sorted(p.request_id for p in loop.agent.accepted.pending()) == sorted(rids)
        assert acked() == rids
        assert loop.replies() == []
        assert executor.run_all() == 2
        loop.agent.run_until_idle()
        assert [r["request_id"] for r in loop.replies()] == rids
        assert acked() == rids, "acknowledged again with its reply"
        assert loop.agent.accepted.pending() == []
        loop.settle()
