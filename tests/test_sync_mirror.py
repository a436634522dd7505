"""The cloud mirror (agent/cloud/mirror.py): fed by hand, fed by the agent's own store code under
hypothesis, and once through a real broker and agent.

The pure tests call ``SyncMirror.on_message`` with payloads made by ``agent.contract.protocol``'s
encoders; what the mirror asks to publish comes back as its return value, so a test sees
every ``sync/request`` it would send.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cloud.mirror import MirrorClient, SyncMirror
from agent.contract import protocol
from agent.edge.loop import Agent
from agent.edge.outbox import OutboxPump
from agent.edge.statesync import StateSync
from agent.errors import StoreError
from agent.mqtt import MqttSettings
from agent.store import Store
from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.checksum import wire_checksum
from testing.cloud import Cloud
from testing.specs import source_spec
from testing.wait import wait_for

NODE = "n1"
T = f"edge/nodes/{NODE}/sync/"
REQUEST = f"{T}request"


def delta(start: int, end: int, changes: dict[str, Any], after: dict[str, Any]) -> bytes:
    return protocol.encode_sync_delta(start, end, changes, wire_checksum(after))


def snapshot(request_id: str, version: int, data: dict[str, Any]) -> bytes:
    return protocol.encode_sync_snapshot(request_id, version, data, wire_checksum(data))


def requested(outgoing: list[tuple[str, bytes, bool]]) -> str:
    """The request_id of the one sync/request in ``outgoing`` (fails if there is none)."""
    assert len(outgoing) == 1, outgoing
    topic, payload, retain = outgoing[0]
    assert topic == REQUEST and retain is False
    return protocol.decode_sync_request(payload)


def history(n: int) -> list[tuple[bytes, dict[str, Any]]]:
    """n deltas of a counter document: (payload of v -> v+1, state at v+1)."""
    out = []
    for v in range(n):
        state = {"count": v + 1, "even": (v + 1) % 2 == 0}
        out.append((delta(v, v + 1, {"count": v + 1, "even": (v + 1) % 2 == 0}, state), state))
    return out


def mirror_at(n: int) -> SyncMirror:
    mirror = SyncMirror()
    for payload, _ in history(n):
        assert mirror.on_message(f"{T}delta", payload) == []
    return mirror


def state_of(mirror: SyncMirror) -> tuple[int, dict[str, Any]] | None:
    got = mirror.get(NODE)
    return None if got is None else (got.version, got.data)


# -- applying deltas ----------------------------------------------------------------------------


def test_in_order_deltas_build_the_state_with_its_checksum() -> None:
    mirror = SyncMirror()
    assert mirror.get(NODE) is None
    mirror.on_message(
        f"{T}delta", delta(0, 1, {"a": 1, "b": {"c": [1]}}, {"a": 1, "b": {"c": [1]}})
    )
    mirror.on_message(f"{T}delta", delta(1, 2, {"a": None, "d": "☃"}, {"b": {"c": [1]}, "d": "☃"}))
    got = mirror.get(NODE)
    assert got is not None and got.version == 2
    assert got.data == {"b": {"c": [1]}, "d": "☃"}
    assert got.checksum == wire_checksum(got.data) and got.verify()
    assert mirror.nodes() == [NODE] and mirror.snapshots_requested(NODE) == 0


def test_repeated_delta_is_ignored() -> None:
    """At-least-once delivery: a delta seen before changes nothing and asks for nothing."""
    mirror = mirror_at(3)
    first, _ = history(3)[0]
    assert mirror.on_message(f"{T}delta", first) == []
    assert state_of(mirror) == (3, {"count": 3, "even": False})


def test_get_returns_a_copy() -> None:
    mirror = mirror_at(1)
    got = mirror.get(NODE)
    assert got is not None
    got.data["count"] = 99
    assert state_of(mirror) == (1, {"count": 1, "even": False})


def test_missed_delta_is_a_gap_held_until_the_snapshot_then_deltas_resume() -> None:
    """A skipped delta makes the mirror ask for a snapshot; deltas arriving meanwhile are
    held back (not applied on top of a hole); the snapshot brings it level; later deltas
    apply on top of the snapshot."""
    deltas = history(6)
    mirror = SyncMirror()
    for payload, _ in deltas[:2]:
        mirror.on_message(f"{T}delta", payload)
    rid = requested(mirror.on_message(f"{T}delta", deltas[3][0]))  # 2 -> 3 was lost
    assert rid.startswith("mirror-")
    assert mirror.on_message(f"{T}delta", deltas[4][0]) == []  # held: no second request
    assert state_of(mirror) == (2, deltas[1][1])
    assert mirror.on_message(f"{T}snapshot", snapshot(rid, 5, deltas[4][1])) == []
    assert state_of(mirror) == (5, deltas[4][1])
    assert mirror.on_message(f"{T}delta", deltas[5][0]) == []
    assert state_of(mirror) == (6, deltas[5][1])
    assert mirror.snapshots_requested(NODE) == 1


def test_mirror_started_late_asks_for_a_snapshot() -> None:
    """The first delta it sees does not start at version 0: it cannot build on nothing."""
    mirror = SyncMirror()
    deltas = history(4)
    rid = requested(mirror.on_message(f"{T}delta", deltas[2][0]))
    assert mirror.get(NODE) is None
    mirror.on_message(f"{T}snapshot", snapshot(rid, 3, deltas[2][1]))
    mirror.on_message(f"{T}delta", deltas[3][0])
    assert state_of(mirror) == (4, deltas[3][1])


def test_delta_with_a_wrong_checksum_is_not_applied_and_asks_for_a_snapshot() -> None:
    mirror = mirror_at(2)
    bad = protocol.encode_sync_delta(2, 3, {"count": 3}, "ab" * 32)
    requested(mirror.on_message(f"{T}delta", bad))
    assert state_of(mirror) == (2, {"count": 2, "even": True})


def test_delta_that_overlaps_what_the_mirror_has_asks_for_a_snapshot() -> None:
    """from_version < version < to_version: a delta coalesced across what it already has."""
    mirror = mirror_at(3)
    merged = delta(1, 5, {"count": 5}, {"count": 5, "even": False})
    requested(mirror.on_message(f"{T}delta", merged))
    assert state_of(mirror) == (3, {"count": 3, "even": False})


def test_snapshot_of_another_requester_is_taken_only_when_newer() -> None:
    mirror = mirror_at(3)
    assert mirror.on_message(f"{T}snapshot", snapshot("theirs-1", 2, {"old": True})) == []
    assert state_of(mirror) == (3, {"count": 3, "even": False})
    mirror.on_message(f"{T}snapshot", snapshot("theirs-2", 9, {"new": True}))
    assert state_of(mirror) == (9, {"new": True})


def test_restore_snapshot_replaces_even_a_newer_mirror() -> None:
    """``restore-...`` snapshots say the node went back to older data: the mirror follows."""
    mirror = mirror_at(5)
    mirror.on_message(f"{T}snapshot", snapshot("restore-abc", 4, {"count": 2}))
    assert state_of(mirror) == (4, {"count": 2})


def raw(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


ZERO = "0" * 64
BAD_MESSAGES: list[tuple[str, bytes]] = [
    ("delta", b"{not json"),
    ("delta", b""),
    ("delta", raw(from_version="0", to_version=1, changes={}, checksum=ZERO)),
    ("delta", raw(from_version=3, to_version=3, changes={}, checksum=ZERO)),
    ("delta", raw(from_version=3, to_version=4, changes=[], checksum=ZERO)),
    ("delta", raw(from_version=3, to_version=4, changes={}, checksum="xyz")),
    ("delta", raw(from_version=3, to_version=4, changes={})),
    ("snapshot", raw(request_id="x", version=9, data={"a": 1}, checksum=ZERO)),
    ("snapshot", raw(version=9, data={}, checksum=wire_checksum({}))),
    ("snapshot", raw(request_id="x", version=9, data=[], checksum=ZERO)),
    ("desired", raw(data={"mode": "eco"})),
    ("desired", raw(version=9, data={"mode": "eco"}, checksum=ZERO)),
    ("desired", b"[1, 2]"),
]


@pytest.mark.parametrize(("kind", "payload"), BAD_MESSAGES)
def test_bad_message_is_logged_and_changes_nothing(
    kind: str, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    mirror = mirror_at(3)
    mirror.on_message(f"{T}desired", protocol.encode_sync_desired(2, {"mode": "off"}))
    with caplog.at_level(logging.WARNING, logger="agent.cloud.mirror"):
        assert mirror.on_message(f"{T}{kind}", payload) == []
    assert "mirror: ignoring bad message" in caplog.text
    assert state_of(mirror) == (3, {"count": 3, "even": False})
    assert mirror.desired(NODE) == (2, {"mode": "off"})
    assert mirror.snapshots_requested(NODE) == 0


def test_other_nodes_and_other_topics_are_ignored() -> None:
    mirror = SyncMirror(nodes=[NODE])
    first = history(1)[0][0]
    assert mirror.on_message("edge/nodes/other/sync/delta", first) == []
    assert mirror.on_message("elsewhere/nodes/n1/sync/delta", first) == []
    assert mirror.on_message(f"edge/nodes/{NODE}/heartbeat", b"{}") == []
    assert mirror.nodes() == []
    everyone = SyncMirror(prefix="site/a")
    everyone.on_message("site/a/nodes/other/sync/delta", first)
    assert everyone.nodes() == ["other"]


def test_set_desired_goes_above_the_retained_version_it_saw() -> None:
    mirror = SyncMirror()
    assert mirror.on_message(f"{T}desired", protocol.encode_sync_desired(5, {"m": 1})) == []
    mirror.on_message(f"{T}desired", protocol.encode_sync_desired(4, {"m": "older"}))
    mirror.on_message(f"{T}desired", b"")  # a cleared retained topic
    assert mirror.desired(NODE) == (5, {"m": 1})
    topic, payload, retain = mirror.set_desired(NODE, {"m": 2})
    assert (topic, retain) == (f"{T}desired", True)
    assert protocol.decode_sync_desired(payload) == (6, {"m": 2})
    assert json.loads(payload)["checksum"] == wire_checksum({"m": 2})
    assert mirror.desired(NODE) == (6, {"m": 2})


def test_wait_for_returns_none_at_its_deadline() -> None:
    mirror = mirror_at(1)
    assert mirror.wait_for(NODE, lambda s: s.version >= 2, timeout=0.05) is None
    got = mirror.wait_for(NODE, lambda s: s.version >= 1, timeout=0.05)
    assert got is not None and got.data == {"count": 1, "even": False}


def test_resync_asks_even_when_level() -> None:
    mirror = mirror_at(2)
    rid = requested(mirror.resync(NODE))
    assert mirror.on_message(f"{T}delta", history(3)[2][0]) == []  # held while it waits
    mirror.on_message(f"{T}snapshot", snapshot(rid, 3, {"count": 3, "even": False}))
    assert state_of(mirror) == (3, {"count": 3, "even": False})


# -- deltas made by the agent's own store, fed in outbox order ------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d", "e"])
SCALARS = (
    st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
)
#: Values below the top level may be null; a top-level None is a delete.
JSON = st.recursive(
    st.none() | SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
CHANGES = st.dictionaries(KEYS, st.none() | JSON, max_size=4)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("commit"), CHANGES),
        st.tuples(st.just("flush"), st.just(None)),
        st.tuples(st.just("dup"), st.integers(min_value=0)),
    ),
    max_size=25,
)


def encode_delta(start: int, end: int, changes: dict[str, Any], checksum: str) -> bytes:
    return protocol.encode_sync_delta(start, end, changes, checksum)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_outbox_deltas_fed_in_order_rebuild_the_store_state(ops: list[tuple[str, Any]]) -> None:
    """Whatever the change sets and wherever the outbox was handed to MQTT (coalescing points),
    the mirror fed the outbox's deltas in order, with repeats of delivered ones mixed in
    (at-least-once), holds exactly the store's state and checksum and never needs a snapshot."""
    mirror = SyncMirror()
    delivered: list[bytes] = []
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "state.db") as store:
        handed = 0  # outbox id up to which items were handed to MQTT (the pump's last_sent_id)

        def flush() -> None:
            nonlocal handed
            for item in store.outbox_peek(1000, after_id=handed):
                assert mirror.on_message(f"{T}delta", item.payload) == []
                delivered.append(item.payload)
                handed = item.id
                store.outbox_ack(item.id)

        for op, arg in ops:
            if op == "commit":
                store.sync_commit(
                    arg,
                    delta_topic=f"{T}delta",
                    encode_delta=encode_delta,
                    coalesce_after_id=handed,
                )
            elif op == "flush":
                flush()
            elif delivered:
                assert mirror.on_message(f"{T}delta", delivered[arg % len(delivered)]) == []
        flush()
        version, data = store.sync_state()
    got = mirror.get(NODE)
    if version == 0:
        assert got is None
        return
    assert got is not None
    assert (got.version, got.data) == (version, data)
    assert got.checksum == wire_checksum(data)


@settings(max_examples=50, deadline=None)
@given(changes=st.lists(CHANGES, min_size=1, max_size=40))
def test_one_coalesced_delta_equals_the_sequence(changes: list[dict[str, Any]]) -> None:
    """Everything committed while offline, as one delta, gives the same state as the same
    changes applied one by one."""
    one, each = SyncMirror(), SyncMirror()
    with (
        tempfile.TemporaryDirectory() as tmp,
        Store(Path(tmp) / "a.db") as coalesced,
        Store(Path(tmp) / "b.db") as single,
    ):
        for change in changes:
            coalesced.sync_commit(
                change, delta_topic="d", encode_delta=encode_delta, coalesce_after_id=0
            )
            single.sync_commit(
                change, delta_topic="d", encode_delta=encode_delta, coalesce_after_id=1 << 60
            )
        items = coalesced.outbox_peek(1000)
        assert len(items) <= 1
        for item in items:
            one.on_message(f"{T}delta", item.payload)
        for item in single.outbox_peek(1000):
            each.on_message(f"{T}delta", item.payload)
        assert coalesced.sync_state() == single.sync_state()
        expected = coalesced.sync_state()
    for mirror in (one, each):
        got = mirror.get(NODE)
        if expected[0] == 0:
            assert got is None
        else:
            assert got is not None and (got.version, got.data) == expected


def deliver(store: Store, sync: StateSync, mirror: SyncMirror, after_id: int = 0) -> None:
    """Hand the outbox to the mirror in order, as the pump and the broker would; the mirror's
    snapshot requests are answered by ``sync`` (their snapshots join the outbox's end)."""
    handed = after_id
    while items := store.outbox_peek(100, after_id=handed):
        for item in items:
            handed = item.id
            for topic, payload, _ in mirror.on_message(item.topic, item.payload):
                assert topic == REQUEST
                sync.on_request(payload)


def test_delta_rewritten_after_a_restart_is_resolved_by_a_snapshot(tmp_path: Path) -> None:
    """After a restart the pump hands the whole outbox over again, so a delta the mirror
    already took (its PUBACK was lost) may have grown: the overlap costs one snapshot."""
    with Store(tmp_path / "state.db") as store:
        pump = OutboxPump(store, lambda *a: 0)
        sync = StateSync(store, protocol.Topics("edge", NODE), pump, tmp_path / "sync.hwm")
        sync.boot()
        mirror = SyncMirror()
        sync.commit({"a": 1}, None)
        sync.commit({"b": 2}, None)
        (first,) = store.outbox_peek(10)
        mirror.on_message(first.topic, first.payload)  # delivered; the agent dies before PUBACK
        assert state_of(mirror) == (2, {"a": 1, "b": 2})
        sync.commit({"a": None}, None)  # after the restart: merged into the same item
        (grown,) = store.outbox_peek(10)
        assert json.loads(grown.payload)["from_version"] == 0
        deliver(store, sync, mirror, after_id=first.id - 1)
        assert mirror.snapshots_requested(NODE) == 1
        assert state_of(mirror) == (3, {"b": 2}) == tuple(store.sync_state())


# -- bugs ---------------------------------------------------------------------------------------


def test_change_after_a_snapshot_request_is_not_lost_by_coalescing(tmp_path: Path) -> None:
    """Reachable whenever a delta is still unsent when a request comes in: the pump's
    window (64 messages) is full on a slow link, or the outbox is long after a reconnect."""
    with Store(tmp_path / "state.db") as store:
        pump = OutboxPump(store, lambda *a: 0)  # not connected: nothing is handed over
        sync = StateSync(store, protocol.Topics("edge", NODE), pump, tmp_path / "sync.hwm")
        sync.boot()
        mirror = SyncMirror()
        rid = requested(mirror.resync(NODE))  # e.g. a mirror that just restarted
        sync.commit({"a": 1}, None)  # delta 0 -> 1, unsent
        sync.on_request(protocol.encode_sync_request(rid))  # snapshot of version 1 queued
        sync.commit({"b": 2}, None)  # merged into the delta queued before the snapshot
        deliver(store, sync, mirror)
        assert store.sync_state() == (2, {"a": 1, "b": 2})
        assert state_of(mirror) == (2, {"a": 1, "b": 2})


def test_whole_directory_restore_is_detected_by_the_mirror() -> None:
    """The node went back from version 10 to 5 (state.db and sync.hwm restored together) and
    commits 5 -> 6 with data the mirror never saw at 6: the mirror must resync."""
    mirror = mirror_at(10)
    restored = delta(5, 6, {"count": "rolled back"}, {"count": "rolled back", "even": False})
    outgoing = mirror.on_message(f"{T}delta", restored)
    rid = requested(outgoing)
    mirror.on_message(f"{T}snapshot", snapshot(rid, 6, {"count": "rolled back", "even": False}))
    assert state_of(mirror) == (6, {"count": "rolled back", "even": False})


def test_mirror_asks_again_after_a_rejected_snapshot() -> None:
    mirror = mirror_at(2)
    rid = requested(mirror.on_message(f"{T}delta", history(4)[3][0]))  # a gap
    corrupt = json.dumps(
        {"request_id": rid, "version": 4, "data": {"count": 4}, "checksum": "0" * 64}
    ).encode()
    outgoing = mirror.on_message(f"{T}snapshot", corrupt)
    outgoing += mirror.on_message(f"{T}delta", history(5)[4][0])
    assert len(outgoing) == 1, "no new sync/request after the rejected snapshot"
    requested(outgoing)


# -- through a real broker and agent -----------------------------------------------------------

COUNTER = (
    "def handler(event, context):\n"
    "    context.state.set('count', context.state.get('count', 0) + 1)\n"
    "    return {'desired': dict(context.desired), 'version': context.desired_version}\n"
)
AGENT = "gw-test"


@pytest.fixture
def running(cloud: Cloud, agent_factory: Callable[..., AgentProcess]) -> Iterator[AgentProcess]:
    agent = agent_factory().start()
    cloud.wait_message(f"edge/nodes/{AGENT}/status", lambda m: m["status"] == "online")
    cloud.deploy(None, source_spec("counter", COUNTER))
    cloud.wait_message(
        f"edge/nodes/{AGENT}/functions/counter/state", lambda m: m["state"] == "active"
    )
    yield agent


def mirror_client(broker: Mosquitto) -> MirrorClient:
    settings_ = MqttSettings(port=broker.port, client_id=f"mirror-{uuid.uuid4().hex[:8]}")
    return MirrorClient(settings_, nodes=[AGENT]).start()


def test_mirror_client_resync_gets_a_snapshot_from_the_agent(
    broker: Mosquitto, cloud: Cloud, running: AgentProcess
) -> None:
    """resync() publishes a sync/request; the agent's snapshot arrives and matches."""
    cloud.invoke(AGENT, "counter", None)
    mirror = mirror_client(broker)
    try:
        mirror.resync(AGENT)
        got = mirror.mirror.wait_for(AGENT, lambda s: s.version >= 1, 10)
        assert got is not None and got.data == {"count": 1}
        assert got.checksum == wire_checksum({"count": 1})
        request = cloud.wait_message(f"edge/nodes/{AGENT}/sync/request")  # the mirror's
        snap = cloud.wait_message(
            f"edge/nodes/{AGENT}/sync/snapshot",
            lambda m: m["request_id"] == request["request_id"],
        )
        assert snap["version"] == 1 and snap["data"] == {"count": 1}
        assert len(cloud.on(f"edge/nodes/{AGENT}/sync/request")) == 1
    finally:
        mirror.stop()


def test_new_mirror_can_set_desired_after_the_retained_desired_was_cleared(
    broker: Mosquitto, cloud: Cloud, running: AgentProcess
) -> None:
    """The node's applied desired version is in its retained status (``sync``): a mirror
    that wants to be obeyed has to go above it."""
    first = mirror_client(broker)
    try:
        first.set_desired(AGENT, {"mode": "eco"})
        first.set_desired(AGENT, {"mode": "boost"})
        running.wait_log("applied desired state version 2")
    finally:
        first.stop()
    cloud.publish(f"edge/nodes/{AGENT}/sync/desired", b"", retain=True)  # an operator's reset
    second = mirror_client(broker)
    try:
        second.set_desired(AGENT, {"mode": "night"})
        wait_for(
            lambda: (
                "applied desired state version 3" in running.log()
                or "is not newer than" in running.log()
            ),
            5,
            "the agent neither applied nor ignored the new mirror's desired state",
        )
        reply = cloud.invoke(AGENT, "counter", None)
        assert reply["result"]["desired"] == {"mode": "night"}, reply
    finally:
        second.stop()


# -- the delta linger (outbox.delta_linger_ms) ---------------------------------------------------


class _Wire:
    """What the pump hands to MQTT, in order, with a hand-driven clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sent: list[tuple[str, bytes]] = []

    def clock(self) -> float:
        return self.now

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool, corr: Any) -> int:
        self.sent.append((topic, payload))
        return len(self.sent)

    def topics(self) -> list[str]:
        return [t.rsplit("/", 1)[-1] if t.startswith(T) else t for t, _ in self.sent]

    def deltas(self) -> list[tuple[int, int]]:
        found = [json.loads(p) for t, p in self.sent if t == f"{T}delta"]
        return [(d["from_version"], d["to_version"]) for d in found]


def lingering(store: Store, tmp_path: Path, linger_s: float) -> tuple[OutboxPump, StateSync, _Wire]:
    wire = _Wire()
    pump = OutboxPump(store, wire.publish, clock=wire.clock, delta_linger_s=linger_s)
    pump.connected = True
    sync = StateSync(store, protocol.Topics("edge", NODE), pump, tmp_path / "sync.hwm")
    sync.boot()
    return pump, sync, wire


def test_delta_linger_merges_a_burst_while_the_replies_go_out(tmp_path: Path) -> None:
    """Five state changes, each followed by its reply: every reply is handed to MQTT at
    once, the five changes leave as ONE delta when the linger is over, and a mirror fed the
    wire ends at the store's state."""
    with Store(tmp_path / "state.db") as store:
        pump, sync, wire = lingering(store, tmp_path, 0.02)
        for n in range(1, 6):
            sync.commit({"count": n, f"k{n}": n}, None)
            store.outbox_put(f"replies/{n}", b"{}", kind="reply")
            pump.drain()
            wire.now += 0.001
        assert wire.topics() == [f"replies/{n}" for n in range(1, 6)]
        assert pump.holding and pump.next_retry_at() == pytest.approx(1000.02)
        pump.retry_due()  # 5 ms early: still held
        assert wire.deltas() == []
        wire.now = 1000.02
        pump.retry_due()
        assert wire.deltas() == [(0, 5)] and not pump.holding
        mirror = SyncMirror()
        for topic, payload in wire.sent:
            if topic.startswith(T):
                assert mirror.on_message(topic, payload) == []
        assert state_of(mirror) == tuple(store.sync_state())
        assert store.sync_state()[0] == 5


def test_a_held_delta_goes_out_before_a_snapshot_and_is_not_rewritten_after(
    tmp_path: Path,
) -> None:
    """A snapshot request while a delta is held: the delta is handed over first (a mirror
    must never see the snapshot overtaken by older changes), and the next change starts a
    new delta instead of rewriting the one already sent."""
    with Store(tmp_path / "state.db") as store:
        pump, sync, wire = lingering(store, tmp_path, 0.02)
        mirror = SyncMirror()
        rid = requested(mirror.resync(NODE))
        sync.commit({"a": 1}, None)
        pump.drain()
        assert wire.sent == [] and pump.holding
        sync.on_request(protocol.encode_sync_request(rid))
        pump.drain()
        assert wire.topics() == ["delta", "snapshot"] and not pump.holding
        sync.commit({"b": 2}, None)
        pump.drain()
        wire.now += 0.02
        pump.retry_due()
        assert wire.deltas() == [(0, 1), (1, 2)]
        for topic, payload in wire.sent:
            mirror.on_message(topic, payload)
        assert state_of(mirror) == (2, {"a": 1, "b": 2}) == tuple(store.sync_state())


def test_zero_linger_sends_every_delta_at_once(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        pump, sync, wire = lingering(store, tmp_path, 0.0)
        for n in range(1, 4):
            sync.commit({"count": n}, None)
            pump.drain()
        assert wire.deltas() == [(0, 1), (1, 2), (2, 3)] and not pump.holding


def test_a_store_error_while_releasing_leaves_the_delta_held_and_nothing_stranded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read of the held delta fails once (a disk error): the delta stays held, and the
    snapshot whose arrival asked for the release is not skipped; both go out, in order, once
    the store reads again."""
    with Store(tmp_path / "state.db") as store:
        pump, sync, wire = lingering(store, tmp_path, 0.02)
        mirror = SyncMirror()
        rid = requested(mirror.resync(NODE))
        sync.commit({"a": 1}, None)
        pump.drain()
        read = store._outbox_get_locked

        def failing_once(item_id: int) -> Any:
            monkeypatch.setattr(store, "_outbox_get_locked", read)
            raise StoreError("disk I/O error (simulated)")

        monkeypatch.setattr(store, "_outbox_get_locked", failing_once)
        with pytest.raises(StoreError):
            sync.on_request(protocol.encode_sync_request(rid))  # its drain meets the failure
        assert pump.holding and wire.sent == []
        pump.drain()
        assert wire.topics() == ["delta", "snapshot"] and not pump.holding
        for topic, payload in wire.sent:
            mirror.on_message(topic, payload)
        assert state_of(mirror) == (1, {"a": 1}) == tuple(store.sync_state())
        assert store.outbox_depth()[0] == 2  # both handed over, awaiting their PUBACKs


def test_the_outbox_sweep_waits_for_a_held_delta(tmp_path: Path) -> None:
    """The sweep after a store fault deletes rows at or below the last id handed to MQTT
    once nothing is in flight: a held delta is below it and was never sent, so it waits."""
    with Store(tmp_path / "state.db") as store:
        pump, sync, wire = lingering(store, tmp_path, 0.02)
        sync.commit({"a": 1}, None)
        pump.drain()
        agent = SimpleNamespace(
            _store_fault=None, outbox=pump, store=store, _timers={}, _update_status_line=list
        )
        Agent._sweep_outbox(agent)  # type: ignore[arg-type]
        assert store.outbox_depth()[0] == 1 and "outbox_sweep" in agent._timers
        wire.now += 0.02
        pump.retry_due()
        assert wire.deltas() == [(0, 1)]


# -- the cloud side stays off the edge's storage -------------------------------------------------


def test_importing_the_mirror_loads_no_sqlite_and_no_edge_storage() -> None:
    """The mirror replays deltas with the contract's pure apply_delta: importing it in a
    fresh interpreter loads no sqlite3, nor agent.store / agent.local / agent.edge."""
    code = (
        "import sys, agent.cloud.mirror; "
        "bad = sorted(m for m in sys.modules if m in ('sqlite3', '_sqlite3') "
        "or m.split('.')[:2] in (['agent', 'store'], ['agent', 'local'], ['agent', 'edge'])); "
        "sys.exit(', '.join(bad) or 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, (
        f"importing agent.cloud.mirror loaded {result.stderr or result.stdout}"
    )
