"""Group commit on the daemon's hot path (issue 15): many replies, or many PUBACK deletes, in
one transaction, with the guarantees of the one-by-one calls (bounds, dedupe, order, and
nothing written when the transaction fails); and the held-back wake-ups of paho's network
thread (``MqttClient.corked``, ``agent.mqtt.wake``)."""

from __future__ import annotations

import contextlib
import random
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.edge.outbox import OutboxPump
from agent.errors import OutboxFull, StoreError
from agent.mqtt import MqttSettings
from agent.mqtt.client import MqttClient
from agent.mqtt.wake import HeldWake
from agent.store import Store
from agent.store.accepted import AcceptedInvoke, AcceptedInvokes


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db", max_messages=3) as s:
        yield s


def _queued(store: Store) -> list[tuple[str, bytes, bytes | None]]:
    return [(i.topic, i.payload, i.correlation) for i in store.outbox_peek(100)]


def test_record_replies_queues_in_order_and_remembers_only_the_named(store: Store) -> None:
    ids = store.record_replies(
        [("r1", "t/a", b"1", None), (None, "t/b", b"2", b"corr"), ("r2", "t/a", b"3", None)],
        ts=100.0,
    )
    assert None not in ids and ids == sorted(ids)
    assert _queued(store) == [("t/a", b"1", None), ("t/b", b"2", b"corr"), ("t/a", b"3", None)]
    assert all(i.kind == "reply" and i.qos == 1 for i in store.outbox_peek(10))
    assert store.outbox_depth() == (3, 3)
    first, second = store.dedupe_get("r1"), store.dedupe_get("r2")
    assert first is not None and (first.reply, first.reply_topic, first.ts) == (b"1", "t/a", 100.0)
    assert second is not None and second.reply == b"3"


def test_record_replies_refuses_only_what_does_not_fit(store: Store) -> None:
    """A full outbox refuses a reply alone: not queued, not remembered; the rest commit."""
    store.outbox_put("x", b"0", kind="reply")
    ids = store.record_replies(
        [("r1", "t", b"1", None), ("r2", "t", b"2", None), ("r3", "t", b"3", None)], ts=1.0
    )
    assert ids[0] is not None and ids[1] is not None and ids[2] is None
    assert store.dedupe_get("r3") is None
    assert store.dedupe_get("r2") is not None
    assert store.outbox_depth() == (3, 3)
    assert [i.payload for i in store.outbox_peek(10)] == [b"0", b"1", b"2"]


def test_record_replies_gives_each_reply_its_own_outbox_id(tmp_path: Path) -> None:
    """The replies go in with one statement (issue 15) and their ids are worked out from
    the last one: each id must still be its own reply's, also around one refused in the
    middle (over the byte bound) and after deletes left gaps in the ids."""
    with Store(tmp_path / "state.db", max_bytes=100) as store:
        old = [store.outbox_put("x", b"o", kind="reply") for _ in range(3)]
        store.outbox_ack_many(old[1:])  # ids 2 and 3 gone: the next are not max + 1 of a run
        replies = [
            ("r1", "t", b"a" * 10, None),
            ("r2", "t", b"b" * 95, None),  # does not fit
            ("r3", "t", b"c" * 20, b"corr"),
            (None, "u", b"d" * 5, None),
        ]
        ids = store.record_replies(replies, ts=1.0)
        assert ids[1] is None
        by_id = {item.id: item for item in store.outbox_peek(10)}
        for (rid, topic, payload, corr), item_id in zip(replies, ids, strict=True):
            if item_id is None:
                continue
            item = by_id[item_id]
            assert (item.topic, item.payload, item.correlation) == (topic, payload, corr), rid
        assert store.dedupe_get("r2") is None and store.dedupe_get("r3") is not None
        assert store.outbox_depth() == (4, 1 + 10 + 20 + 5)


def test_record_replies_deletes_accepted_records_in_its_own_transaction(store: Store) -> None:
    accepted = AcceptedInvokes(store)
    for rid in ("r1", "r2"):
        accepted.put(AcceptedInvoke(rid, b"{}", None, None, 1.0))
    store.record_replies([("r1", "t", b"1", None)], ts=1.0, also=[accepted.done_statement("r1")])
    assert [p.request_id for p in accepted.pending()] == ["r2"]


def test_a_failing_record_replies_writes_nothing(store: Store) -> None:
    """Any failure but a full outbox rolls the whole group back: no reply queued, none
    remembered, no accepted record gone, and the depth counter unchanged."""
    accepted = AcceptedInvokes(store)
    accepted.put(AcceptedInvoke("r1", b"{}", None, None, 1.0))
    with pytest.raises(StoreError):
        store.record_replies(
            [("r1", "t", b"1", None), ("r2", "t", b"2", None)],
            ts=1.0,
            also=[accepted.done_statement("r1"), ("INSERT INTO no_such_table VALUES (1)", ())],
        )
    assert store.outbox_peek(10) == []
    assert store.outbox_depth() == (0, 0)
    assert store.dedupe_get("r1") is None and store.dedupe_get("r2") is None
    assert [p.request_id for p in accepted.pending()] == ["r1"]
    assert store.record_replies([("r1", "t", b"1", None)], ts=1.0) != [None]  # usable again


def test_outbox_ack_many_deletes_what_is_queued_and_keeps_the_depth(store: Store) -> None:
    a = store.outbox_put("a", b"12", kind="reply")
    b = store.outbox_put("b", b"345", kind="reply")
    c = store.outbox_put("c", b"6", kind="reply")
    assert store.outbox_ack_many([a, c, 9999]) == 2
    assert store.outbox_depth() == (1, 3)
    assert [i.id for i in store.outbox_peek(10)] == [b]
    assert store.outbox_ack_many([]) == 0
    assert store.outbox_ack_many([a]) == 0  # already gone: not found, as outbox_ack
    assert store.outbox_depth() == (1, 3)


def test_outbox_ack_many_is_one_transaction(store: Store) -> None:
    """A delete that fails part-way leaves every item queued (and the depth as it was)."""
    a = store.outbox_put("a", b"1", kind="reply")
    b = store.outbox_put("b", b"2", kind="reply")
    store.db.write(
        "test trigger",
        f"CREATE TRIGGER refuse BEFORE DELETE ON outbox WHEN old.id = {b}"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        (),
    )
    with pytest.raises(StoreError, match="refused by the test"):
        store.outbox_ack_many([a, b])
    assert [i.id for i in store.outbox_peek(10)] == [a, b]
    assert store.outbox_depth() == (2, 2)


def test_outbox_ack_many_takes_more_ids_than_one_statement_binds(tmp_path: Path) -> None:
    with Store(tmp_path / "big.db") as big:
        ids = [big.outbox_put("t", b"x", kind="reply") for _ in range(1_200)]
        assert big.outbox_ack_many(ids) == 1_200
        assert big.outbox_depth() == (0, 0) and big.outbox_peek(10) == []


def test_acknowledged_many_deletes_delivered_and_keeps_refused(store: Store) -> None:
    sent: list[str] = []

    def publish(topic: str, *_: object) -> int:
        sent.append(topic)
        return len(sent)  # mid = position

    pump = OutboxPump(store, publish, window=8)
    pump.connected = True
    for topic in ("a", "b", "c"):
        store.outbox_put(topic, b"x", kind="reply")
    pump.drain()
    not_ours = pump.acknowledged_many([(1, 0, "Success"), (3, 0x97, "Quota"), (42, 0, "")])
    assert not_ours == [42]
    assert [i.topic for i in store.outbox_peek(10)] == ["b", "c"]  # c waits for its retry
    assert pump.awaiting_retry == 1 and pump.in_flight == 1
    assert pump.acknowledged_many([(2, 0, "Success")]) == []
    assert [i.topic for i in store.outbox_peek(10)] == ["c"]


def test_corked_client_wakes_paho_once() -> None:
    left, right = socket.socketpair()
    try:
        client = MqttClient(MqttSettings(), lambda event: None)
        paho_client = type("P", (), {"_sockpairW": left})()
        client._client = paho_client  # type: ignore[assignment]
        right.setblocking(False)
        with client.corked():
            wake = paho_client._sockpairW
            assert isinstance(wake, HeldWake)
            for _ in range(5):
                wake.send(b"0")
            with pytest.raises(BlockingIOError):
                right.recv(10)  # nothing sent while corked
        assert right.recv(10) == b"0"  # one wake-up for the five
        with client.corked():
            pass
        with pytest.raises(BlockingIOError):
            right.recv(10)  # none wanted, none sent
        wake.send(b"0")  # uncorked: straight through
        assert right.recv(10) == b"0"
        assert wake.fileno() == left.fileno()  # everything else is the socket's own
    finally:
        left.close()
        right.close()


def test_corked_is_harmless_before_start() -> None:
    client = MqttClient(MqttSettings(), lambda event: None)
    with client.corked():
        pass


def test_corked_fails_safe_when_paho_will_not_take_the_wrapper() -> None:
    """paho's wake-up socket is private API: a paho whose ``_sockpairW`` cannot be replaced
    (a read-only property, __slots__) must cost the cork, never the batch the loop already
    took off its queue (the exception would escape ``Agent.step`` and stop the agent)."""
    left, right = socket.socketpair()
    try:
        client = MqttClient(MqttSettings(), lambda event: None)

        class ReadOnly:
            @property
            def _sockpairW(self) -> socket.socket:
                return left

        client._client = ReadOnly()  # type: ignore[assignment]
        ran = False
        with client.corked():
            ran = True
        assert ran
    finally:
        left.close()
        right.close()


def test_a_wake_up_wanted_while_the_cork_is_released_is_not_lost() -> None:
    """``send`` from another thread (paho's own, a timer's) may find the cork held, and
    ``release`` run before it notes the wake-up as wanted: that wake-up must still be sent,
    or paho's thread sleeps with a packet queued (until its select times out)."""
    left, right = socket.socketpair()
    right.setblocking(False)
    try:

        class Interleaved(HeldWake):
            """Runs the loop thread's ``release`` between the sender's check and its note."""

            def __setattr__(self, name: str, value: object) -> None:
                if name == "wanted" and value is True and self.held:
                    HeldWake.release(self)
                object.__setattr__(self, name, value)

        wake = Interleaved(left)
        wake.held = True
        wake.send(b"0")  # the other thread; the loop's release ran inside it
        assert wake.held is False
        assert right.recv(10) == b"0"  # the wake-up went out all the same
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize("returning", [True, False], ids=["delete-returning", "select-then-delete"])
def test_outbox_ack_many_counts_what_it_deleted_either_way(
    store: Store, monkeypatch: pytest.MonkeyPatch, returning: bool
) -> None:
    """One DELETE ... RETURNING where SQLite has it (3.35+), a SELECT and a DELETE before:
    both must delete the same items and keep the same depth."""
    from agent.store import outbox

    monkeypatch.setattr(outbox, "_RETURNING", returning)
    ids = [store.outbox_put("t", b"x" * n, kind="reply") for n in (1, 2, 3)]
    assert store.outbox_ack_many([ids[0], ids[2], 999_999]) == 2
    assert store.outbox_depth() == (1, 2)
    assert [i.id for i in store.outbox_peek(10)] == [ids[1]]


# -- the outbox's tail: a group commit's replies are not read back (issue 15) ------------


def _truth(path: Path, after_id: int, limit: int) -> list[tuple[int, str, bytes]]:
    """What the table holds above ``after_id``, read on a connection of its own."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
    return [(int(i), str(t), bytes(p)) for i, t, p in rows]


def _reads(store: Store) -> list[str]:
    """The SELECTs from the outbox the store's connection runs from now on."""
    seen: list[str] = []
    store.db.connection().set_trace_callback(
        lambda sql: seen.append(sql) if sql.startswith("SELECT") and "outbox" in sql else None
    )
    return seen


def test_peek_hands_out_a_group_commits_replies_without_reading_them_back(
    tmp_path: Path,
) -> None:
    with Store(tmp_path / "state.db") as store:
        first = store.record_replies([("r1", "t/a", b"1", None), (None, "t/b", b"2", b"c")], ts=1.0)
        reads = _reads(store)
        items = store.outbox_peek(64, after_id=0, claim=True)  # ids start at 1: the tail
        assert reads == []
        assert [(i.id, i.topic, i.payload, i.correlation) for i in items] == [
            (first[0], "t/a", b"1", None),
            (first[1], "t/b", b"2", b"c"),
        ]
        assert all((i.kind, i.qos, i.retain, i.key) == ("reply", 1, False, None) for i in items)
        more = store.record_replies([("r2", "t/a", b"3", None)], ts=2.0)
        assert [i.id for i in store.outbox_peek(64, after_id=first[1], claim=True)] == more
        assert reads == []
        assert store.outbox_peek(64, after_id=more[0], claim=True) == []  # nothing above
        assert reads == []
        assert store.outbox_peek(64, after_id=0) != []  # below the tail: the table says
        assert len(reads) == 1


def test_peek_reads_the_table_when_anything_else_was_queued_after_the_tail(
    tmp_path: Path,
) -> None:
    """A message queued another way (a status, a state, a keyed supersede) after a group
    commit is not in the tail: the peek must read, and must not skip it."""
    path = tmp_path / "state.db"
    with Store(path) as store:
        ids = store.record_replies([("r1", "t", b"1", None)], ts=1.0)
        status = store.outbox_put("status", b"s", kind="status", key="status")
        later = store.record_replies([("r2", "t", b"2", None)], ts=1.0)
        got = [(i.id, i.topic, i.payload) for i in store.outbox_peek(64, after_id=0, claim=True)]
        assert got == _truth(path, 0, 64)
        assert got == [(ids[0], "t", b"1"), (status, "status", b"s"), (later[0], "t", b"2")]


def test_a_rolled_back_group_commit_leaves_nothing_in_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store(path) as store:
        kept = store.record_replies([("r1", "t", b"1", None)], ts=1.0)
        with pytest.raises(StoreError):
            store.record_replies(
                [("r2", "t", b"2", None)], ts=1.0, also=[("INSERT INTO nope VALUES (1)", ())]
            )
        assert [i.id for i in store.outbox_peek(64, after_id=0, claim=True)] == kept
        again = store.record_replies([("r3", "t", b"3", None)], ts=1.0)  # may reuse the id
        got = [(i.id, i.payload) for i in store.outbox_peek(64, after_id=kept[0], claim=True)]
        assert got == [(again[0], b"3")] == [(i, p) for i, _, p in _truth(path, kept[0], 64)]


def test_peek_matches_the_table_through_a_random_mix_of_writes(tmp_path: Path) -> None:
    """Group commits, keyed and plain puts, refusals of a full outbox, failed group
    commits, acknowledgements (now and noted), reopen: every claim-peek the pump would make
    returns exactly what the table holds above its last id."""
    path = tmp_path / "state.db"
    rng = random.Random(15)
    store = Store(path, max_messages=60)
    store.open()
    last = 0
    peeks = served = 0
    try:
        for step in range(1500):
            op = rng.random()
            if op < 0.3:
                n = rng.randint(1, 6)
                store.record_replies(
                    [(f"r{step}-{k}", "t", f"{step}-{k}".encode(), None) for k in range(n)],
                    ts=float(step),
                )
            elif op < 0.38:
                key = rng.choice([None, "status", "state/a"])
                with contextlib.suppress(OutboxFull):
                    store.outbox_put("o", f"p{step}".encode(), kind="status", key=key)
            elif op < 0.42:
                with pytest.raises(StoreError):
                    store.record_replies(
                        [(f"x{step}", "t", b"x", None)],
                        ts=1.0,
                        also=[("INSERT INTO nope VALUES (1)", ())],
                    )
            elif op < 0.72:
                limit = rng.randint(1, 8)
                reads = _reads(store)
                got = [
                    (i.id, i.topic, i.payload)
                    for i in store.outbox_peek(limit, after_id=last, claim=True)
                ]
                peeks, served = peeks + 1, served + (not reads)
                assert got == _truth(path, last, limit), f"step {step}"
                if got:
                    last = got[-1][0]
            elif op < 0.97:
                sent = [i for i, _, _ in _truth(path, 0, 64) if i <= last]
                done = rng.sample(sent, k=min(len(sent), rng.randint(0, 8)))
                if rng.random() < 0.5:
                    store.outbox_ack_later(done)
                else:
                    store.outbox_ack_many(done)
            elif op < 0.99:
                store.outbox_flush_acked()
            else:
                store.outbox_flush_acked()
                store.close()
                store = Store(path, max_messages=60)
                store.open()
                last = 0  # a restart sends the whole outbox again
            count = len(_truth(path, 0, 10_000))
            assert store.outbox_depth()[0] == count, f"step {step}: depth"
    finally:
        store.close()
    assert peeks > 300 and peeks - 50 > served > 50, (peeks, served)  # both paths ran


def test_noted_acks_go_with_the_next_group_commit_and_survive_its_failure(
    tmp_path: Path,
) -> None:
    with Store(tmp_path / "state.db") as store:
        sent = store.record_replies([("r1", "t", b"11", None), ("r2", "t", b"2", None)], ts=1.0)
        store.outbox_ack_later(sent)
        assert store.outbox_depth() == (2, 3) and store.outbox_acks_noted() == 2
        with pytest.raises(StoreError):  # rolled back: the deletes too, still noted
            store.record_replies(
                [("r3", "t", b"3", None)], ts=1.0, also=[("INSERT INTO nope VALUES (1)", ())]
            )
        assert store.outbox_depth() == (2, 3) and store.outbox_acks_noted() == 2
        new = store.record_replies([("r4", "t", b"444", None)], ts=1.0)
        assert store.outbox_acks_noted() == 0
        assert [i.id for i in store.outbox_peek(10)] == new
        assert store.outbox_depth() == (1, 3)
        store.outbox_ack_later(new)
        assert store.outbox_flush_acked() == 1
        assert store.outbox_flush_acked() == 0  # nothing noted: no transaction
        assert store.outbox_depth() == (0, 0)


def test_the_pump_notes_delivered_items_when_it_lingers(store: Store) -> None:
    """With ``ack_linger_s`` a run of PUBACKs is only noted; ``flush_acked`` deletes it, and
    ``idle`` counts nothing as queued that the broker took."""
    clock = [10.0]
    pump = OutboxPump(store, lambda *a: next(mids), ack_linger_s=0.1, clock=lambda: clock[0])
    mids = iter(range(1, 100))
    pump.connected = True
    store.record_replies([("r1", "t", b"1", None), ("r2", "t", b"2", None)], ts=1.0)
    pump.drain()
    assert pump.acknowledged_many([(1, 0, "Success"), (2, 0, "Success")]) == []
    assert store.outbox_depth()[0] == 2 and pump.acked_due_at() == pytest.approx(10.1)
    assert pump.idle()  # deletes what is noted first
    assert store.outbox_depth() == (0, 0) and pump.acked_due_at() is None
