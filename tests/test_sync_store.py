"""The synced-state tables of the store (agent/store/state.py) on real SQLite files: commits,
delta coalescing in the outbox, replies in the same transaction, bounds, restarts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.contract import protocol
from agent.store import OutboxFull, ReplyRecord, Store, SyncCommit
from testing.checksum import wire_checksum

TOPIC = "edge/nodes/n1/sync/delta"
NEVER = 1 << 62  # coalesce_after_id past every id: never merge (as if all were sent)


def commit(
    store: Store, changes: dict[str, Any], after: int = 0, reply: ReplyRecord | None = None
) -> SyncCommit | None:
    return store.sync_commit(
        changes,
        delta_topic=TOPIC,
        encode_delta=protocol.encode_sync_delta,
        coalesce_after_id=after,
        reply=reply,
    )


def queued_deltas(store: Store) -> list[dict[str, Any]]:
    return [json.loads(i.payload) for i in store.outbox_peek(100_000) if i.kind == "sync_delta"]


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store(tmp_path / "state.db") as s:
        yield s


# -- commits ------------------------------------------------------------------------------------


def test_commit_applies_changes_bumps_the_version_and_queues_a_delta(store: Store) -> None:
    assert store.sync_state() == (0, {})
    done = commit(store, {"a": 1, "b": {"c": [1, 2]}})
    assert done is not None
    assert (done.from_version, done.to_version, done.coalesced) == (0, 1, False)
    assert done.checksum == wire_checksum({"a": 1, "b": {"c": [1, 2]}})
    assert store.sync_state() == (1, {"a": 1, "b": {"c": [1, 2]}})
    (item,) = store.outbox_peek(10)
    assert (item.id, item.topic, item.qos, item.retain, item.kind) == (
        done.delta_id,
        TOPIC,
        1,
        False,
        "sync_delta",
    )
    message = protocol.decode_sync_delta(item.payload)
    assert message["changes"] == {"a": 1, "b": {"c": [1, 2]}}
    assert message["checksum"] == done.checksum


def test_none_deletes_and_noop_writes_are_dropped(store: Store) -> None:
    """None deletes; writing the current value or deleting a missing key is no change at all
    (no version, no delta); values compare as canonical JSON (1, 1.0 and True differ,
    dict key order does not)."""
    commit(store, {"a": 1, "d": {"x": 1, "y": 2}}, after=NEVER)
    assert commit(store, {"a": 1, "missing": None, "d": {"y": 2, "x": 1}}, after=NEVER) is None
    assert store.sync_state()[0] == 1
    for value in (1.0, True, 1):
        done = commit(store, {"a": value}, after=NEVER)
        assert done is not None and done.changes == {"a": value}
    done = commit(store, {"a": None, "missing": None}, after=NEVER)
    assert done is not None and done.changes == {"a": None}
    assert store.sync_state() == (5, {"d": {"x": 1, "y": 2}})
    assert [d["to_version"] for d in queued_deltas(store)] == [1, 2, 3, 4, 5]


def test_state_returned_is_a_copy(store: Store) -> None:
    commit(store, {"a": [1]})
    _, data = store.sync_state()
    data["a"].append(2)
    data["b"] = 1
    assert store.sync_state() == (1, {"a": [1]})


# -- coalescing ---------------------------------------------------------------------------------


def test_thousand_unsent_changes_to_ten_keys_are_one_delta(store: Store) -> None:
    """1,000 commits while nothing was handed to MQTT: ONE queued delta from 0 to 1000 with
    the final value of every key and the checksum of the final document."""
    final: dict[str, Any] = {}
    for i in range(1000):
        key = f"sensor-{i % 10}"
        value = {"reading": i, "ok": i % 3 != 0}
        final[key] = value
        done = commit(store, {key: value}, after=0)
        assert done is not None and done.coalesced == (i > 0)
    (item,) = store.outbox_peek(10)
    message = protocol.decode_sync_delta(item.payload)
    assert (message["from_version"], message["to_version"]) == (0, 1000)
    assert message["changes"] == final
    assert message["checksum"] == wire_checksum(final)
    assert store.sync_state() == (1000, final)
    assert store.outbox_depth() == (1, len(item.payload))


def test_delta_handed_to_mqtt_is_never_rewritten(store: Store) -> None:
    """Once the pump has handed a delta over (its id <= coalesce_after_id) the next change
    starts a new delta, which later changes merge into."""
    first = commit(store, {"a": 1}, after=0)
    assert first is not None
    second = commit(store, {"a": 2}, after=first.delta_id)
    third = commit(store, {"b": 3}, after=first.delta_id)
    assert second is not None and third is not None
    assert not second.coalesced and third.coalesced
    assert second.delta_id == third.delta_id != first.delta_id
    deltas = queued_deltas(store)
    assert [(d["from_version"], d["to_version"], d["changes"]) for d in deltas] == [
        (0, 1, {"a": 1}),
        (1, 3, {"a": 2, "b": 3}),
    ]
    assert deltas[1]["checksum"] == wire_checksum({"a": 2, "b": 3})


def test_coalescing_merges_past_other_messages_in_the_outbox(store: Store) -> None:
    """Replies queued in between do not stop a merge into the newest unsent delta."""
    commit(store, {"a": 1})
    store.outbox_put("edge/nodes/n1/replies", b"{}", kind="reply")
    commit(store, {"a": 2})
    kinds = [i.kind for i in store.outbox_peek(10)]
    assert kinds == ["sync_delta", "reply"]
    assert [(d["from_version"], d["to_version"]) for d in queued_deltas(store)] == [(0, 2)]


def test_created_then_deleted_while_unsent_stays_a_delete(store: Store) -> None:
    """A key made and removed in one coalesced delta is sent as null: harmless to a mirror
    that never had it, and the checksum is the document's without it."""
    commit(store, {"keep": 1})
    commit(store, {"temp": 2})
    commit(store, {"temp": None})
    (message,) = queued_deltas(store)
    assert message["changes"] == {"keep": 1, "temp": None}
    assert message["checksum"] == wire_checksum({"keep": 1})


def test_deleted_then_recreated_while_unsent_carries_the_new_value(store: Store) -> None:
    sent = commit(store, {"k": "old"})
    assert sent is not None
    commit(store, {"k": None}, after=sent.delta_id)
    commit(store, {"k": "new"}, after=sent.delta_id)
    deltas = queued_deltas(store)
    assert [(d["from_version"], d["to_version"], d["changes"]) for d in deltas] == [
        (0, 1, {"k": "old"}),
        (1, 3, {"k": "new"}),
    ]


# -- replies in the same transaction ------------------------------------------------------------


def reply_record(rid: str, body: bytes = b'{"ok":true}') -> ReplyRecord:
    return ReplyRecord(rid, "edge/nodes/n1/replies", body, 1_700_000_000.0, b"corr")


def test_reply_is_queued_and_remembered_with_the_change(store: Store) -> None:
    done = commit(store, {"a": 1}, reply=reply_record("r1"))
    assert done is not None
    items = store.outbox_peek(10)
    assert [(i.kind, i.correlation) for i in items] == [("sync_delta", None), ("reply", b"corr")]
    entry = store.dedupe_get("r1")
    assert entry is not None and entry.reply == b'{"ok":true}'
    assert entry.reply_topic == "edge/nodes/n1/replies"


def test_reply_without_an_effective_change_is_still_queued(store: Store) -> None:
    commit(store, {"a": 1})
    assert commit(store, {"a": 1}, reply=reply_record("r2")) is None
    assert store.sync_state()[0] == 1
    assert [i.kind for i in store.outbox_peek(10)] == ["sync_delta", "reply"]
    assert store.dedupe_get("r2") is not None


def test_outbox_full_writes_nothing(tmp_path: Path) -> None:
    """OutboxFull (here: no room for the reply) rolls back the state, the version, the
    delta, the reply and its dedupe entry; the store stays usable."""
    with Store(tmp_path / "state.db", max_messages=2) as store:
        commit(store, {"a": 1}, after=NEVER)
        before_items = store.outbox_peek(10)
        with pytest.raises(OutboxFull):  # the new delta fits, the reply does not
            commit(store, {"a": 2, "b": 1}, after=NEVER, reply=reply_record("r3"))
        assert store.sync_state() == (1, {"a": 1})
        assert store.outbox_peek(10) == before_items
        assert store.outbox_depth() == (1, len(before_items[0].payload))
        assert store.dedupe_get("r3") is None
        # a merge needs no room of its own, its reply does: r4 fits, r5 does not
        commit(store, {"a": 2}, after=0, reply=reply_record("r4"))
        with pytest.raises(OutboxFull):
            commit(store, {"a": 3}, after=0, reply=reply_record("r5"))
        assert store.dedupe_get("r4") is not None and store.dedupe_get("r5") is None
        assert store.sync_state() == (2, {"a": 2})
        assert [(d["to_version"], d["changes"]) for d in queued_deltas(store)] == [(2, {"a": 2})]
    with Store(tmp_path / "state.db") as reopened:
        assert reopened.sync_state() == (2, {"a": 2})


def test_outbox_full_on_a_new_delta_keeps_the_old_state(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db", max_messages=1) as store:
        commit(store, {"a": 1}, after=NEVER)
        with pytest.raises(OutboxFull):
            commit(store, {"a": 2}, after=NEVER)
        assert store.sync_state() == (1, {"a": 1})
        assert len(queued_deltas(store)) == 1


# -- versions, restarts, desired ----------------------------------------------------------------


def test_state_version_and_queued_delta_survive_reopening(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        commit(store, {"a": {"nested": ["x"]}, "b": "☃"})
        commit(store, {"b": None})
    with Store(tmp_path / "state.db") as store:
        assert store.sync_state() == (2, {"a": {"nested": ["x"]}})
        assert [(d["from_version"], d["to_version"]) for d in queued_deltas(store)] == [(0, 2)]
        done = commit(store, {"c": 1})  # a fresh process merges into what was never sent
        assert done is not None and done.coalesced and done.to_version == 3


def test_raise_version_only_moves_up_and_keeps_the_data(store: Store) -> None:
    commit(store, {"a": 1})
    store.sync_raise_version(7)
    store.sync_raise_version(3)
    assert store.sync_state() == (7, {"a": 1})
    done = commit(store, {"a": 2}, after=NEVER)
    assert done is not None and (done.from_version, done.to_version) == (7, 8)


def test_desired_state_round_trip(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db") as store:
        assert store.desired_state() == (0, {})
        store.set_desired_state(3, {"mode": "eco", "limits": [1, 2]})
        store.set_desired_state(4, {"mode": "boost"})
    with Store(tmp_path / "state.db") as store:
        assert store.desired_state() == (4, {"mode": "boost"})
        assert store.sync_state() == (0, {})  # desired never leaks into reported state


# -- bugs ---------------------------------------------------------------------------------------


def test_coalesced_delta_respects_the_outbox_byte_bound(tmp_path: Path) -> None:
    with Store(tmp_path / "state.db", max_bytes=4000) as store:
        commit(store, {"a": 1})
        with pytest.raises(OutboxFull):
            commit(store, {"b": "x" * 10_000})
        assert store.outbox_depth()[1] <= 4000
