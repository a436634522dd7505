"""Attacks on the outbox's delete linger and tail (commit 704615d).

A delivered item's row is no longer deleted at its PUBACK but noted (``Store.outbox_ack_later``)
and deleted by the next group commit of replies, by the loop ``ACK_LINGER_S`` later, at the
stop, or in ``OutboxPump.idle``; and ``Outbox.peek`` hands out a group commit's replies from
memory (the tail) while no other insert came after them. These tests try to make a peek
return a wrong set, the depth lie, a reply get lost or sent twice by one process, or a row
stay forever, at three levels:

- the store and the pump (a real SQLite file, a fake publisher and clock), including two
  threads that write the outbox at once as the loop and the executor threads do, with every
  peek compared to a SELECT on a connection of its own;
- the daemon's loop in-process (``testing.fakes``: fake MQTT client, clock and pool);
- a real agent process on a real Mosquitto (SIGTERM, kill -9, a full disk).

Bugs found here, fixed, and pinned by the tests named after them: a stop on a failing store
with acks noted exited 1 (``Agent.shutdown`` let the flush's StoreError out); a lingering
row took room at the outbox bound (admission and single enqueues now delete the noted rows
first).
Nothing sleeps to synchronise: waits poll a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import signal
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_loop_inprocess import NODE, Loop, started_loop

from agent.cloud.mirror import SyncMirror
from agent.config import parse_config
from agent.contract import protocol
from agent.edge.loop import ACK_LINGER_S, Agent
from agent.edge.outbox import OutboxPump
from agent.edge.systemd import Notifier
from agent.errors import StoreError
from agent.local.cluster import EdgeCluster
from agent.store import ReplyRecord, Store, SyncJob
from agent.store.outbox import _TAIL_MAX
from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.fakes import FakeClock, FakeMqttClient, FakePool, InlineExecutor
from testing.specs import source_spec
from testing.tmpfs import fill
from testing.tmpfs import small_tmpfs as mounted_tmpfs
from testing.wait import wait_for

AgentFactory = Callable[..., AgentProcess]

# -- helpers: the truth, a publisher, a clock ----------------------------------------------

_COLUMNS = "id, topic, payload, kind, key"
Row = tuple[int, str, bytes, str, str | None]


class Reader:
    """A connection of its own on the store's file: what the table really holds."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, check_same_thread=False)

    def close(self) -> None:
        self.conn.close()

    def above(self, after_id: int, limit: int = 1_000_000) -> list[Row]:
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        ).fetchall()
        return [(int(i), str(t), bytes(p), str(k), y) for i, t, p, k, y in rows]

    def depth(self) -> tuple[int, int]:
        count, nbytes = self.conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox"
        ).fetchone()
        return int(count), int(nbytes)

    def payload(self, item_id: int) -> bytes | None:
        row = self.conn.execute("SELECT payload FROM outbox WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else bytes(row[0])


def _rows(items: list[Any]) -> list[Row]:
    return [(i.id, i.topic, i.payload, i.kind, i.key) for i in items]


def _delta(from_version: int, to_version: int, changes: dict[str, Any], checksum: str) -> bytes:
    body = {"from_version": from_version, "to_version": to_version, "changes": changes}
    return json.dumps({**body, "checksum": checksum}, sort_keys=True).encode()


class Publisher:
    """The pump's publish: records (mid, topic, payload); mids count up from 1."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str, bytes]] = []

    def __call__(
        self, topic: str, payload: bytes, qos: int, retain: bool, corr: bytes | None
    ) -> int:
        self.sent.append((len(self.sent) + 1, topic, payload))
        return len(self.sent)

    def payloads(self) -> list[bytes]:
        return [payload for _, _, payload in self.sent]


def pump_on(store: Store, clock: FakeClock, **options: Any) -> tuple[OutboxPump, Publisher]:
    """A connected pump with the daemon's delete linger, a fake publisher and clock."""
    publisher = Publisher()
    pump = OutboxPump(
        store, publisher, ack_linger_s=ACK_LINGER_S, clock=clock, rng=random.Random(1), **options
    )
    pump.connected = True
    return pump, publisher


def puback_all(pump: OutboxPump, publisher: Publisher, upto: int = 0) -> None:
    """PUBACK (success) every mid above ``upto`` handed out so far."""
    mids = [mid for mid, _, _ in publisher.sent if mid > upto]
    pump.acknowledged_many([(mid, 0, "Success") for mid in mids])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db") as s:
        yield s


# -- the store and the pump ------------------------------------------------------------------


def test_peeks_match_the_table_while_another_thread_commits_state(tmp_path: Path) -> None:
    """The loop group-commits replies, claims, notes and flushes acks, dead-letters and
    requeues; an executor thread meanwhile commits state (coalescing deltas, with replies),
    persists write sets and queues keyed and plain messages. Every claim-peek equals what
    the table holds above the pump's last id at that instant (read on another connection
    with the store's lock held), the depth equals the table, no claimed delta is rewritten,
    the deltas handed out chain up to the stored document, and nothing queued is lost."""
    path = tmp_path / "state.db"
    store = Store(path)
    store.open()
    # An RLock, so the checker can hold it across a peek (which takes it) and its SELECT:
    # every store operation is atomic under the lock, so this is every interleaving there is.
    store.db.lock = threading.RLock()  # type: ignore[assignment]
    reader = Reader(path)
    errors: list[BaseException] = []
    start = threading.Barrier(2, timeout=10)
    peek_sql: list[str] = []
    store.db.connection().set_trace_callback(
        lambda sql: peek_sql.append(sql) if "FROM outbox WHERE id > " in sql else None
    )
    replies_queued: set[bytes] = set()  # unkeyed messages: each must be handed out once
    queued_lock = threading.Lock()
    steps = 1200
    # The executor thread writes once every few loop steps (paced by the loop's progress,
    # not by a sleep): often enough to interleave everywhere, rarely enough for the tail.
    progress = threading.Condition()
    loop_step = [0]

    def loop_thread() -> None:
        rng = random.Random(704)
        last = 0
        sent: list[tuple[int, str]] = []  # (id, kind) handed out, not acknowledged yet
        claimed: dict[int, bytes] = {}
        handed: list[Row] = []
        peeks = 0
        try:
            start.wait()
            for step in range(steps):
                with progress:
                    loop_step[0] = step
                    progress.notify_all()
                op = rng.random()
                if op < 0.3:
                    batch = [
                        (f"r{step}-{k}", "t/reply", f"loop {step}-{k}".encode(), None)
                        for k in range(rng.randint(1, 6))
                    ]
                    ids = store.record_replies(batch, ts=float(step))
                    assert None not in ids, ids
                    with queued_lock:
                        replies_queued.update(payload for _, _, payload, _ in batch)
                elif op < 0.65:
                    limit = rng.randint(1, 9)
                    with store.db.lock:
                        got = _rows(store.outbox_peek(limit, last, claim=True))
                        truth = reader.above(last, limit)
                        assert got == truth, f"step {step}: {got} != {truth}"
                        assert store.outbox_depth() == reader.depth(), f"step {step}: depth"
                        for item_id, _, payload, kind, _ in got:
                            if kind == "sync_delta":
                                claimed[item_id] = payload
                    peeks += 1
                    handed += got
                    sent += [(row[0], row[3]) for row in got]
                    if got:
                        last = got[-1][0]
                elif op < 0.9 and sent:
                    done = [sent.pop(0)[0] for _ in range(min(len(sent), rng.randint(1, 8)))]
                    if rng.random() < 0.8:
                        store.outbox_ack_later(done)
                    else:
                        store.outbox_ack_many(done)
                elif op < 0.95:
                    store.outbox_flush_acked()
                elif op < 0.97 and sent and sent[0][1] == "reply":  # (a delta would break
                    store.outbox_dead_letter(  # the chain checked at the end)
                        sent.pop(0)[0], reason_code=0x87, reason="test", attempts=1, ts=1.0
                    )
                else:
                    store.dead_letters_request_retry()
                    store.dead_letters_requeue()
                with store.db.lock:
                    for item_id, payload in claimed.items():
                        now = reader.payload(item_id)
                        assert now in (None, payload), f"claimed delta {item_id} was rewritten"
            with progress:
                loop_step[0] = steps
                progress.notify_all()
            start.wait()  # the other thread is done: hand out the rest
            with store.db.lock:
                rest = _rows(store.outbox_peek(1_000_000, last, claim=True))
                assert rest == reader.above(last)
            handed += rest
            store.outbox_ack_later([row[0] for row in rest] + [item_id for item_id, _ in sent])
            store.outbox_flush_acked()
            assert store.outbox_depth() == reader.depth() == (0, 0)
            assert len({row[0] for row in handed}) == len(handed), "an id handed out twice"
            unkeyed = {payload for _, _, payload, kind, key in handed if key is None}
            with queued_lock:
                lost = replies_queued - unkeyed
            assert not lost, f"never handed out: {sorted(lost)[:5]}"
            deltas = [json.loads(p) for _, _, p, kind, _ in handed if kind == "sync_delta"]
            version, document = 0, {}
            for delta in deltas:  # the mirror's rule: each must start where the last ended
                assert delta["from_version"] == version, (version, delta)
                version = delta["to_version"]
                for key, value in delta["changes"].items():
                    if value is None:
                        document.pop(key, None)
                    else:
                        document[key] = value
            assert (version, document) == store.sync_state()
            served = peeks - len(peek_sql)  # from the tail, without a read
            assert peeks > 200 and served > 25, (peeks, served)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            start.abort()

    def executor_thread() -> None:
        rng = random.Random(15)
        try:
            start.wait()
            step = 0
            while True:
                step += rng.randint(1, 6)
                target = min(step, steps)
                with progress:
                    if not progress.wait_for(lambda t=target: loop_step[0] >= t, 30):
                        raise AssertionError(f"the loop thread stalled before step {step}")
                if step >= steps:
                    break
                op = rng.random()
                key = f"k{rng.randint(0, 4)}"
                if op < 0.35:
                    payload = f"state reply {step}".encode()
                    reply = ReplyRecord(f"s{step}", "t/reply", payload, float(step))
                    store.sync_commit(
                        {key: step if rng.random() < 0.9 else None},
                        delta_topic="t/delta",
                        encode_delta=_delta,
                        coalesce_after_id=0,  # the store knows what the pump claimed
                        reply=reply,
                    )
                    with queued_lock:
                        replies_queued.add(payload)
                elif op < 0.6:
                    version, _ = store.sync_state()
                    payload = f"persisted reply {step}".encode()
                    job = SyncJob(
                        {key: f"p{step}"},
                        ReplyRecord(f"p{step}", "t/reply", payload, float(step)),
                        version + 1,
                        f"sum{step}",
                    )
                    store.sync_persist(
                        [job], delta_topic="t/delta", encode_delta=_delta, coalesce_after_id=0
                    )
                    with queued_lock:
                        replies_queued.add(payload)
                elif op < 0.8:
                    store.outbox_put("t/status", f"status {step}".encode(), kind="status",
                                     key=rng.choice(["status", f"state:{key}"]))  # fmt: skip
                else:
                    payload = f"plain {step}".encode()
                    store.outbox_put("t/plain", payload, kind="reply")
                    with queued_lock:
                        replies_queued.add(payload)
            start.wait()
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=loop_thread), threading.Thread(target=executor_thread)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads), "a thread did not finish within 60s"
    finally:
        reader.close()
        store.close()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    assert not errors, errors


def test_a_puback_for_a_superseded_row_finds_nothing_and_the_newer_row_still_goes(
    store: Store, tmp_path: Path
) -> None:
    """A retained function state handed to MQTT, superseded before its PUBACK: the PUBACK
    is noted, its delete finds nothing, the depth stays exact and the newer state is still
    sent (once)."""
    clock = FakeClock()
    pump, publisher = pump_on(store, clock)
    reader = Reader(tmp_path / "state.db")
    try:
        store.record_replies([("r1", "t/reply", b"one", None)], ts=1.0)
        first = store.outbox_put("t/state", b"deploying", kind="state", key="state:f")
        pump.drain()
        newer = store.outbox_put("t/state", b"active", kind="state", key="state:f")
        assert store.outbox_depth() == reader.depth() == (2, 3 + len(b"active"))
        puback_all(pump, publisher)  # for "one" and the superseded "deploying"
        assert store.outbox_acks_noted() == 2
        assert store.outbox_depth() == reader.depth()
        later = store.record_replies([("r2", "t/reply", b"two", None)], ts=2.0)  # takes them
        assert store.outbox_acks_noted() == 0
        assert [row[0] for row in reader.above(0)] == [newer, *later]
        assert store.outbox_depth() == reader.depth() == (2, len(b"active") + 3)
        pump.drain()
        assert publisher.payloads() == [b"one", b"deploying", b"active", b"two"]
        puback_all(pump, publisher, upto=2)
        clock.advance(ACK_LINGER_S)
        pump.flush_acked()
        assert store.outbox_depth() == reader.depth() == (0, 0)
        assert first not in [row[0] for row in reader.above(0)]
    finally:
        reader.close()


def test_a_refused_reply_retried_while_its_neighbours_are_noted(
    store: Store, tmp_path: Path
) -> None:
    """Three replies; the middle one is refused (transient), the others delivered and
    noted. A group commit deletes the neighbours; the refused one is sent again after its
    backoff (only it), its PUBACK noted and flushed: nothing sent twice but it, nothing left."""
    clock = FakeClock()
    pump, publisher = pump_on(store, clock, retry_min_s=1.0, retry_max_s=1.0)
    reader = Reader(tmp_path / "state.db")
    try:
        ids = store.record_replies([(f"r{i}", "t/reply", b"r%d" % i, None) for i in range(3)], ts=1)
        pump.drain()
        assert [mid for mid, _, _ in publisher.sent] == [1, 2, 3]
        pump.acknowledged_many([(1, 0, "Success"), (2, 0x97, "Quota exceeded"), (3, 0, "ok")])
        assert store.outbox_acks_noted() == 2 and pump.awaiting_retry == 1
        more = store.record_replies([("r9", "t/reply", b"r9", None)], ts=2)
        assert [row[0] for row in reader.above(0)] == [ids[1], *more]
        assert store.outbox_depth() == reader.depth()
        pump.drain()  # r9 goes; r1 waits out its backoff
        clock.advance(1.0)
        pump.retry_due()
        assert publisher.payloads() == [b"r0", b"r1", b"r2", b"r9", b"r1"]
        puback_all(pump, publisher, upto=3)
        assert pump.idle()  # flushes what is noted
        assert store.outbox_depth() == reader.depth() == (0, 0)
    finally:
        reader.close()


def test_dead_letters_and_their_requeue_while_acks_are_noted_and_the_tail_is_served(
    store: Store, tmp_path: Path
) -> None:
    """A reply refused for good is dead-lettered while its neighbours' acks are noted; the
    operator's retry requeues it behind what the group commits queued since: every peek is
    the table, the requeued copy goes out once, the depth is exact throughout."""
    clock = FakeClock()
    pump, publisher = pump_on(store, clock)
    reader = Reader(tmp_path / "state.db")
    peeks: list[tuple[list[Row], list[Row]]] = []
    peek = store.outbox_peek

    def checked_peek(limit: int, after_id: int = 0, *, claim: bool = False) -> list[Any]:
        items = peek(limit, after_id, claim=claim)
        peeks.append((_rows(items), reader.above(after_id, limit)))
        return items

    store.outbox_peek = checked_peek  # type: ignore[method-assign]
    try:
        store.record_replies([(f"r{i}", "t/reply", b"a%d" % i, None) for i in range(4)], ts=1)
        pump.drain()
        pump.acknowledged_many([(1, 0, "ok"), (2, 0x87, "Not authorized"), (3, 0, "ok")])
        assert store.dead_letter_counts() == (1, 0) and store.outbox_acks_noted() == 2
        assert store.outbox_depth() == reader.depth() == (3, 6)  # a0 a2 noted, a3 in flight
        store.record_replies([("r4", "t/reply", b"a4", None)], ts=2)
        assert store.outbox_depth() == reader.depth() == (2, 4)
        store.dead_letters_request_retry()
        assert store.dead_letters_requeue() == 1
        store.record_replies([("r5", "t/reply", b"a5", None)], ts=3)
        pump.drain()
        assert publisher.payloads() == [b"a0", b"a1", b"a2", b"a3", b"a4", b"a1", b"a5"]
        puback_all(pump, publisher, upto=3)
        pump.flush_acked()
        assert store.outbox_depth() == reader.depth() == (0, 0)
        assert store.dead_letter_counts() == (0, 0)
        assert all(got == truth for got, truth in peeks), peeks
    finally:
        reader.close()


def test_no_state_commit_merges_into_a_delivered_delta_whose_row_lingers(
    store: Store, tmp_path: Path
) -> None:
    """A delta handed to MQTT (held back first, then released), delivered and noted: its row
    is still the newest delta in the table, but the next commits must queue a new delta,
    never rewrite the delivered one (the cloud would never see the change)."""
    clock = FakeClock()
    pump, publisher = pump_on(store, clock, delta_linger_s=0.02)
    reader = Reader(tmp_path / "state.db")
    commit = {"delta_topic": "t/delta", "encode_delta": _delta}
    try:
        first = store.sync_commit({"a": 1}, coalesce_after_id=pump.last_sent_id, **commit)
        assert first is not None
        pump.drain()  # claimed and held: merged into still
        merged = store.sync_commit({"b": 2}, coalesce_after_id=pump.last_sent_id, **commit)
        assert merged is not None and merged.coalesced and merged.delta_id == first.delta_id
        clock.advance(0.02)
        pump.retry_due()  # released: sent as it is now
        [(mid, _, sent)] = publisher.sent
        pump.acknowledged_many([(mid, 0, "Success")])
        assert store.outbox_acks_noted() == 1 and reader.payload(first.delta_id) == sent
        after = store.sync_commit({"a": 3}, coalesce_after_id=pump.last_sent_id, **commit)
        assert after is not None and not after.coalesced, "merged into a delivered delta"
        assert reader.payload(first.delta_id) == sent
        store.record_replies([("r", "t/reply", b"r", None)], ts=1)  # deletes the noted row
        assert reader.payload(first.delta_id) is None
        pump.drain()
        clock.advance(0.02)
        pump.retry_due()
        deltas = [json.loads(p) for _, t, p in publisher.sent if t == "t/delta"]
        assert [(d["from_version"], d["to_version"]) for d in deltas] == [(0, 2), (2, 3)]
        assert deltas[1]["changes"] == {"a": 3}
    finally:
        reader.close()


def test_a_crash_within_the_linger_of_a_delivered_delta_costs_a_snapshot_never_a_silent_gap(
    tmp_path: Path,
) -> None:
    """kill -9 while a delivered delta's row lingers: the next start finds it unclaimed and
    merges the next change into it (documented: docs/protocol.md, "a delta the broker had
    already taken may come back with more changes in it"). The mirror, which has applied it,
    sees an overlap and asks for a snapshot: the state is never silently wrong."""
    path = tmp_path / "state.db"
    mirror = SyncMirror(nodes=["gw"])
    topic = "edge/nodes/gw/sync/delta"
    commit = {"delta_topic": topic, "encode_delta": protocol.encode_sync_delta}
    store = Store(path)
    store.open()
    pump, publisher = pump_on(store, FakeClock())
    assert store.sync_commit({"a": 1}, coalesce_after_id=0, **commit) is not None
    pump.drain()
    [(mid, _, first)] = publisher.sent
    assert mirror.on_message(topic, first) == []
    assert _mirrored(mirror) == (1, {"a": 1})
    pump.acknowledged_many([(mid, 0, "Success")])
    assert store.outbox_acks_noted() == 1
    store.close()  # kill -9: nothing deletes the noted row
    with Store(path) as again:
        merged = again.sync_commit({"b": 2}, coalesce_after_id=0, **commit)
        assert merged is not None and merged.coalesced  # into the delivered delta
        pump, publisher = pump_on(again, FakeClock())
        pump.drain()
        [(_, _, resent)] = publisher.sent
        assert json.loads(resent)["from_version"] == 0
        asked = mirror.on_message(topic, resent)
        assert [t for t, _, _ in asked] == ["edge/nodes/gw/sync/request"], asked
        assert _mirrored(mirror) == (1, {"a": 1})  # not applied over what it has
        assert mirror.snapshots_requested("gw") == 1


def _mirrored(mirror: SyncMirror) -> tuple[int, dict[str, Any]] | None:
    state = mirror.get("gw")
    return None if state is None else (state.version, state.data)


def test_offline_past_the_tail_cap_then_online_delivers_every_reply_once_in_order(
    store: Store, tmp_path: Path
) -> None:
    """Offline, group commits queue far more replies than the tail keeps (``_TAIL_MAX``);
    back online the pump drains them with a window of 64 while more group commits come and
    acks are noted and flushed: every peek is the table, every reply goes out exactly once
    and in id order, and the outbox ends empty."""
    clock = FakeClock()
    pump, publisher = pump_on(store, clock)
    pump.connected = False
    reader = Reader(tmp_path / "state.db")
    peek = store.outbox_peek
    mismatches: list[Any] = []

    def checked_peek(limit: int, after_id: int = 0, *, claim: bool = False) -> list[Any]:
        items = peek(limit, after_id, claim=claim)
        truth = reader.above(after_id, limit)
        if _rows(items) != truth:
            mismatches.append((after_id, limit, _rows(items)[:3], truth[:3]))
        return items

    store.outbox_peek = checked_peek  # type: ignore[method-assign]
    rng = random.Random(512)
    order: list[bytes] = []

    def commit(n: int) -> None:
        batch = [(None, "t/reply", b"m%05d" % (len(order) + k), None) for k in range(n)]
        store.record_replies(batch, ts=1.0)
        order.extend(payload for _, _, payload, _ in batch)

    try:
        while len(order) < 2 * _TAIL_MAX + 100:
            commit(rng.randint(1, 5))
        pump.connected = True
        pump.drain()
        acked_upto = 0
        for _ in range(10_000):
            if len(publisher.sent) == len(order) and store.outbox_depth() == (0, 0):
                break
            if rng.random() < 0.2 and len(order) < 3 * _TAIL_MAX:
                commit(rng.randint(1, 4))
            upto = len(publisher.sent)
            pump.acknowledged_many([(m, 0, "ok") for m in range(acked_upto + 1, upto + 1)])
            acked_upto = upto
            if rng.random() < 0.3:
                clock.advance(ACK_LINGER_S)
                pump.flush_acked()
            pump.drain()
            pump.idle()
        assert not mismatches, mismatches[:3]
        assert publisher.payloads() == order  # each once, in the order queued
        assert store.outbox_depth() == reader.depth() == (0, 0)
    finally:
        reader.close()


def test_a_single_reply_finds_the_room_a_group_commit_would_find(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db", max_messages=2) as store:
        clock = FakeClock()
        pump, publisher = pump_on(store, clock)
        store.record_replies([(f"r{i}", "t/reply", b"x", None) for i in range(2)], ts=1.0)
        pump.drain()
        puback_all(pump, publisher)  # the broker took both: nothing is owed any more
        assert store.outbox_acks_noted() == 2
        assert store.outbox_has_room(1), "no room while the outbox owes nothing"
        store.record_reply("r3", "t/reply", b"y", ts=2.0)  # raises OutboxFull now


def test_a_full_disk_in_the_middle_keeps_the_noted_acks_the_tail_and_the_depth_exact(
    tmp_path: Path,
) -> None:
    """The disk fills while acks are noted: the group commit and the flush both fail and
    roll back, the acks stay noted, peeks and the depth stay the table's; once space is
    back the next group commit deletes them and every reply goes out once."""
    with mounted_tmpfs(tmp_path / "small", size="4m") as mount:
        _disk_full_with_noted_acks(mount)


def _disk_full_with_noted_acks(mount: Path) -> None:
    path = mount / "state.db"
    clock = FakeClock()
    big = b"z" * 200_000
    with Store(path) as store:
        reader = Reader(path)
        try:
            pump, publisher = pump_on(store, clock)
            first = store.record_replies([(f"r{i}", "t", b"a%d" % i, None) for i in range(3)], ts=1)
            pump.drain()
            puback_all(pump, publisher)
            second = store.record_replies([("r3", "t", b"b", None)], ts=1)  # takes the acks
            pump.drain()
            puback_all(pump, publisher, upto=3)
            assert store.outbox_acks_noted() == 1
            filler = mount / "filler"
            fill(filler)
            with pytest.raises(StoreError) as failed:
                store.outbox_flush_acked()
            assert "full" in str(failed.value), failed.value
            with pytest.raises(StoreError):
                store.record_replies([("r4", "t", big, None)], ts=2)
            assert store.outbox_acks_noted() == 1
            assert store.outbox_depth() == reader.depth() == (1, 1)
            assert [row[0] for row in reader.above(0)] == second
            assert store.outbox_peek(10, pump.last_sent_id, claim=True) == []
            filler.unlink()
            third = store.record_replies([("r5", "t", b"c", None)], ts=3)
            assert store.outbox_acks_noted() == 0
            assert [row[0] for row in reader.above(0)] == third
            assert store.outbox_depth() == reader.depth() == (1, 1)
            pump.drain()
            assert publisher.payloads() == [b"a0", b"a1", b"a2", b"b", b"c"]
            assert first[-1] < second[0] < third[0]
        finally:
            reader.close()


# -- the daemon's loop, in-process ------------------------------------------------------------


class TickingClock(FakeClock):
    """A fake clock that, once ``tick`` is set, moves that much at every read: a stop's
    deadlines pass without real waiting, whatever the loop does meanwhile."""

    tick = 0.0

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@contextlib.contextmanager
def booted(tmp_path: Path) -> Iterator[Loop]:
    """A booted, connected loop (as ``started_loop``) that the test stops itself; stopped
    here only if the test did not get that far (its deployer threads must not outlive it).
    The broker PUBACKs the agent's status at once (the stop waits for its "offline")."""
    state_dir = tmp_path / "state"
    config = parse_config(
        {
            "node": {"id": NODE, "capabilities": ["python"]},
            "agent": {"state_dir": str(state_dir), "shutdown_grace_s": 2.0},
            "runtime": {"function_uids": "", "max_workers": 2},
        }
    )
    store = Store(state_dir / "state.db")
    pool = FakePool()
    clock = TickingClock()
    agent = Agent(
        config, store=store, pool=pool, notifier=Notifier(None), clock=clock,
        executor=InlineExecutor(),
    )  # fmt: skip
    client = FakeMqttClient(sink=agent.post)
    publish = client.publish

    def publish_status_acked(topic: str, payload: bytes, **options: Any) -> int:
        mid = publish(topic, payload, **options)
        if topic == agent.topics.status and options.get("qos", 1) > 0:
            client.puback(mid)
        return mid

    client.publish = publish_status_acked  # type: ignore[method-assign]
    agent.mqtt = client
    agent.boot()
    client.connect(session_present=False)
    agent.run_until_idle()
    loop = Loop(agent, client, pool, clock, store)
    try:
        yield loop
    finally:
        if not client.stopped:
            store.__dict__.pop("outbox_flush_acked", None)  # whatever the test broke
            clock.tick = 0.01
            agent.shutdown()


def _stop(loop: Loop) -> int:
    """SIGTERM, as the loop sees it: the stop asked for, then ``shutdown``."""
    loop.agent.request_stop()
    loop.agent.run_until_idle()
    assert loop.agent.stopping
    assert isinstance(loop.clock, TickingClock)
    loop.clock.tick = 0.01  # the grace passes as the stop reads the clock
    return loop.agent.shutdown()


def _rows_in(db: Path) -> list[bytes]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return [bytes(p) for (p,) in conn.execute("SELECT payload FROM outbox ORDER BY id")]


def _delivered_and_noted(loop: Loop, n: int) -> list[str]:
    """Answer ``n`` invokes, PUBACK every reply: their rows are noted, not deleted."""
    rids = [loop.invoke("echo", i) for i in range(n)]
    loop.agent.run_until_idle()
    loop.mqtt.puback_all()
    loop.agent.run_until_idle()
    assert loop.store.outbox_acks_noted() == n and loop.store.outbox_depth()[0] == n
    return rids


def test_a_stop_deletes_the_noted_rows_of_delivered_replies(tmp_path: Path) -> None:
    """SIGTERM within the linger: the stop deletes what the broker took (the next start
    must not send it again); the state.db has no delivered row left."""
    with booted(tmp_path) as loop:
        loop.deploy("echo")
        loop.settle()
        _delivered_and_noted(loop, 3)
        assert _stop(loop) == 0
        assert loop.mqtt.stopped and loop.store.outbox_acks_noted() == 0
    assert _rows_in(tmp_path / "state" / "state.db") == []


def test_a_stop_with_noted_acks_on_a_failing_store_still_stops_cleanly(tmp_path: Path) -> None:
    with booted(tmp_path) as loop:
        loop.deploy("echo")
        loop.settle()
        _delivered_and_noted(loop, 2)

        def disk_full() -> int:
            cause = OSError(errno.ENOSPC, "No space left on device")
            raise StoreError("outbox_ack_many failed: database or disk is full") from cause

        loop.store.outbox_flush_acked = disk_full  # type: ignore[method-assign]
        loop.clock.advance(ACK_LINGER_S)
        loop.agent.run_until_idle()  # the linger's flush fails: degraded, still noted
        assert loop.agent.faults.reason is not None
        assert loop.store.outbox_acks_noted() == 2
        assert _stop(loop) == 0  # raises the StoreError now
        assert loop.pool.closed and loop.mqtt.stopped


def test_an_invoke_is_admitted_once_the_broker_took_everything(tmp_path: Path) -> None:
    with started_loop(tmp_path) as loop:
        loop.deploy("echo")
        loop.settle()
        loop.store.set_limits(max_messages=2)  # what a reload of outbox.max_messages does
        _delivered_and_noted(loop, 2)
        rid = loop.invoke("echo", "after")
        loop.agent.run_until_idle()
        [reply] = [r for r in loop.replies() if r["request_id"] == rid]
        assert reply.get("ok"), reply  # {'ok': False, 'error': {'type': 'overloaded', ...}}


def test_a_reconnect_with_noted_acks_resends_only_what_the_broker_did_not_take(
    loop: Loop,
) -> None:
    """Replies out, one PUBACK noted, the link drops, more replies are queued offline (their
    group commit deletes the noted row), the link comes back: paho resends only the two
    unacknowledged, the pump sends the new ones once, and everything ends deleted."""
    loop.deploy("echo")
    loop.settle()
    first = [loop.invoke("echo", i) for i in range(3)]
    loop.agent.run_until_idle()
    sent = loop.mqtt.on(loop.topics.replies)
    assert [s.json()["request_id"] for s in sent] == first
    loop.mqtt.puback(sent[0].mid)
    loop.agent.run_until_idle()
    assert loop.store.outbox_acks_noted() == 1
    loop.mqtt.disconnect()
    loop.agent.run_until_idle()
    offline = [loop.invoke("echo", 10 + i) for i in range(2)]
    loop.agent.run_until_idle()
    assert loop.store.outbox_acks_noted() == 0 and loop.store.outbox_depth()[0] == 4
    loop.mqtt.connect(session_present=True)
    loop.agent.run_until_idle()
    resent = [s for s in loop.mqtt.published if s.resent and s.topic == loop.topics.replies]
    assert sorted(s.mid for s in resent) == [sent[1].mid, sent[2].mid]
    assert [r["request_id"] for r in loop.replies()] == first + offline  # first sends: once
    loop.settle()
    assert loop.store.outbox_depth() == (0, 0) and loop.store.outbox_acks_noted() == 0


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    with started_loop(tmp_path) as started:
        yield started


# -- a real agent ---------------------------------------------------------------------------

RNODE = "gw-test"
STATUS = f"edge/nodes/{RNODE}/status"
INVOKE = f"edge/nodes/{RNODE}/invoke"
REPLIES = f"edge/nodes/{RNODE}/replies"
STATE = "edge/nodes/gw-test/functions/{}/state"
ECHO = "def handler(event):\n    return {'echo': event}\n"


def _replies(cloud: Cloud, topic: str = REPLIES) -> dict[str, list[bytes]]:
    """Every reply the cloud saw, by request id (a duplicate shows up twice)."""
    with cloud._lock:
        messages = list(cloud.messages)
    out: dict[str, list[bytes]] = {}
    for t, payload, _ in messages:
        if (t == topic or t.endswith("/replies")) and payload:
            rid = json.loads(payload).get("request_id")
            if isinstance(rid, str):
                out.setdefault(rid, []).append(payload)
    return out


def _outbox_rows(agent: AgentProcess) -> list[dict[str, Any]]:
    """The replies in the agent's state.db outbox (read-only, while it runs or not)."""
    db = agent.state_dir / "state.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        rows = conn.execute("SELECT payload FROM outbox WHERE kind = 'reply'").fetchall()
    return [json.loads(p) for (p,) in rows]


def _serving(cloud: Cloud, agent_factory: AgentFactory, **agent: Any) -> AgentProcess:
    process = agent_factory(agent={"shutdown_grace_s": 5.0, **agent}).start()
    cloud.wait_message(STATUS, lambda m: m["status"] == "online", timeout=15)
    cloud.deploy(None, source_spec("echo", ECHO))
    cloud.wait_message(STATE.format("echo"), lambda m: m["state"] == "active", timeout=20)
    return process


@contextlib.contextmanager
def _pubacks_held(
    broker: Mosquitto, cloud: Cloud, agent: AgentProcess, prefix: str, count: int
) -> Iterator[list[str]]:
    """Publish ``count`` echo invokes; once one is answered, SIGSTOP the broker so the
    PUBACKs of the replies still going out wait, and yield their request ids once a reply
    sits in the outbox waiting for its PUBACK. SIGCONT on the way out."""
    assert broker.proc is not None
    rids = [f"{prefix}-{i}-{uuid.uuid4().hex[:6]}" for i in range(count)]
    for i, rid in enumerate(rids):
        cloud.publish(INVOKE, {"request_id": rid, "function_id": "echo", "payload": i})
    wait_for(lambda: _replies(cloud), 10, "no reply at all")
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: _outbox_rows(agent), 10, "no reply waited for its PUBACK")
        yield rids
    finally:
        broker.proc.send_signal(signal.SIGCONT)


def test_sigterm_while_pubacks_are_due_exits_0_with_no_delivered_row_left(
    broker: Mosquitto, cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """SIGTERM while the broker still owes the PUBACKs of a burst's replies: the stop waits
    for them, notes them, and deletes them before it exits (exit 0); the state.db holds no
    reply the cloud got, so the next start sends none again. Requests the broker delivers
    during the stop are not taken (nor acknowledged): the next start answers them, once."""
    agent = _serving(cloud, agent_factory)
    with _pubacks_held(broker, cloud, agent, "term", 20) as rids:
        agent.signal(signal.SIGTERM)
        agent.wait_log("received SIGTERM")
    assert agent.wait_exit(15) == 0, agent.log_tail()
    assert _outbox_rows(agent) == [], "a delivered reply stays for the next start to resend"
    assert "stopped; 0 messages left in the outbox" in agent.log(), agent.log_tail()
    answered = set(_replies(cloud))
    agent.start()  # what the stop did not take, the broker delivers again
    wait_for(
        lambda: set(rids) <= set(_replies(cloud)),
        15,
        f"replies lost: {sorted(set(rids) - set(_replies(cloud)))} "
        f"(answered before the stop: {len(answered & set(rids))})",
    )
    copies = {rid: len(_replies(cloud)[rid]) for rid in rids}
    assert all(n == 1 for n in copies.values()), f"answered more than once: {copies}"


def test_kill9_while_acks_are_noted_resends_them_and_the_controller_copes(
    broker: Mosquitto, cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """kill -9 within the linger: the delivered reply's row is still in state.db, so the
    next start sends it again (at least once). The fleet controller counts it as a late
    reply and goes on; the copy is the same reply; the outbox drains to empty."""
    agent = _serving(cloud, agent_factory)
    with EdgeCluster.connect("127.0.0.1", broker.port, heartbeat_interval_s=1.0) as cluster:
        controller = cluster.controller
        caught: str | None = None
        for attempt in range(10):  # the row lingers 0.1 s: catch the agent inside it
            result = controller.invoke(RNODE, "echo", {"n": attempt}, timeout=10)
            agent.signal(signal.SIGSTOP)
            if any(row["request_id"] == result.request_id for row in _outbox_rows(agent)):
                caught = result.request_id
                break
            agent.signal(signal.SIGCONT)
        assert caught is not None, "never caught a delivered reply's row within its linger"
        agent.kill9()
        late = controller.stats["late_replies"]
        agent.start()
        wait_for(
            lambda: len(_replies(cloud).get(caught, [])) >= 2,
            15,
            f"the reply to {caught} was not sent again after the restart",
        )
        first, again = _replies(cloud)[caught][:2]
        assert first == again
        wait_for(lambda: controller.stats["late_replies"] > late, 5, "no late reply counted")
        assert controller.invoke(RNODE, "echo", "still", timeout=10).value == {"echo": "still"}
        wait_for(lambda: not _outbox_rows(agent), 10, "the outbox did not drain after restart")


@pytest.fixture
def full_disk_state_dir(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs at the agent's state dir, unmounted afterwards."""
    with mounted_tmpfs(tmp_path / f"state-{RNODE}") as state:
        yield state


def test_sigterm_on_a_full_disk_with_noted_acks_stops_cleanly(
    broker: Mosquitto, cloud: Cloud, agent_factory: AgentFactory, full_disk_state_dir: Path
) -> None:
    agent = _serving(cloud, agent_factory)
    with _pubacks_held(broker, cloud, agent, "full", 10) as rids:
        fill(full_disk_state_dir / "filler")
    wait_for(lambda: set(rids) <= set(_replies(cloud)), 15, "replies lost on the full disk")
    agent.wait_log("outbox_ack_many failed")  # the noted acks' delete failed: still noted
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit(15) == 0, agent.log_tail()
