"""agent.store against real SQLite files in tmp_path (no sqlite3 import here: the db header is
read by hand where the file format itself is what is being checked)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent.store.db as store_module
from agent import errors
from agent.errors import AgentError, StoreError
from agent.store import DedupeEntry, DeploymentRow, OutboxFull, OutboxItem, Store

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store(db_path) as s:
        yield s


def header(path: Path) -> tuple[int, int, int]:
    """(write version, read version, user_version) from the SQLite file header."""
    data = path.read_bytes()[:100]
    assert data[:16] == b"SQLite format 3\x00"
    return data[18], data[19], int.from_bytes(data[60:64], "big")


def deployment(fid: str = "f1", **changes: object) -> DeploymentRow:
    values: dict[str, object] = {
        "function_id": fid,
        "version": "2",
        "sha256": "ab" * 32,
        "fingerprint": "fp-2",
        "spec_json": f'{{"id": "{fid}", "version": "2"}}',
        "code_dir": f"/var/lib/edge-agent/functions/{fid}/2-abababababab",
        "state": "rejected",
        "error_json": '{"type": "deployment_rejected", "message": "bad zip"}',
        "active_version": "1",
        "active_code_dir": f"/var/lib/edge-agent/functions/{fid}/1-cdcdcdcdcdcd",
        "active_spec_json": f'{{"id": "{fid}", "version": "1"}}',
        "updated_ts": 1700000000.5,
    }
    values.update(changes)
    return DeploymentRow(**values)  # type: ignore[arg-type]


# -- lifecycle and schema -------------------------------------------------------------


def test_constructor_touches_nothing(db_path: Path) -> None:
    """Building a Store must not create its directory or file."""
    Store(db_path, durability="full")
    assert not db_path.parent.exists()


def test_open_creates_private_dir_and_wal_database(db_path: Path) -> None:
    with Store(db_path):
        assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    # File format 2/2 = WAL; user_version = the number of migrations.
    assert header(db_path) == (2, 2, len(store_module.MIGRATIONS))


@pytest.mark.parametrize(("durability", "level"), [("normal", 1), ("full", 2)])
def test_durability_sets_synchronous(db_path: Path, durability: str, level: int) -> None:
    with Store(db_path, durability=durability) as s:
        conn = s.db.conn  # peeking at the pragma is the point of this test
        assert conn is not None
        assert conn.execute("PRAGMA synchronous").fetchone() == (level,)
        assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_bad_constructor_arguments_rejected(db_path: Path) -> None:
    with pytest.raises(ValueError, match="durability"):
        Store(db_path, durability="paranoid")
    with pytest.raises(ValueError, match="max_messages"):
        Store(db_path, max_messages=0)
    with pytest.raises(ValueError, match="max_bytes"):
        Store(db_path, max_bytes=0)


def test_data_survives_close_and_reopen(db_path: Path) -> None:
    with Store(db_path) as s:
        s.set_meta("last_connect_ts", "1700000000")
        s.put_spec_source("fleet", "f1", '{"v": 1}')
        s.put_deployment(deployment())
        item_id = s.outbox_put("edge/nodes/n1/status", b"online", retain=True, kind="status")
        s.dedupe_put("r1", "edge/replies", b"done", 10.0)
    with Store(db_path) as s:
        assert s.get_meta("last_connect_ts") == "1700000000"
        assert s.get_spec_sources() == {"f1": {"fleet": '{"v": 1}'}}
        assert s.get_deployment("f1") == deployment()
        assert [i.id for i in s.outbox_peek(10)] == [item_id]
        assert s.dedupe_get("r1") == DedupeEntry("edge/replies", b"done", 10.0)


def test_reopen_runs_each_migration_once(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A later migration runs once; reopening does not run it again (it would fail)."""
    with Store(db_path) as s:
        s.set_meta("k", "v")
    released = list(store_module.MIGRATIONS)
    monkeypatch.setattr(store_module, "MIGRATIONS", [*released, "CREATE TABLE x (a)"])
    for _ in range(2):
        with Store(db_path) as s:
            assert s.get_meta("k") == "v"
        assert header(db_path)[2] == len(released) + 1


def test_failed_migration_changes_nothing(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A migration that fails half way leaves neither its tables nor a new user_version."""
    with Store(db_path):
        pass
    released = list(store_module.MIGRATIONS)
    bad = "CREATE TABLE x (a); INSERT INTO no_such_table VALUES (1);"
    monkeypatch.setattr(store_module, "MIGRATIONS", [*released, bad])
    with pytest.raises(StoreError, match=f"migration to version {len(released) + 1}"):
        Store(db_path).open()
    assert header(db_path)[2] == len(released)
    # Table x was rolled back, so a good migration that creates it again succeeds.
    monkeypatch.setattr(store_module, "MIGRATIONS", [*released, "CREATE TABLE x (a)"])
    with Store(db_path):
        pass
    assert header(db_path)[2] == len(released) + 1


def test_newer_schema_refused(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = list(store_module.MIGRATIONS)
    monkeypatch.setattr(store_module, "MIGRATIONS", [*original, "CREATE TABLE x (a)"])
    with Store(db_path):
        pass
    monkeypatch.setattr(store_module, "MIGRATIONS", original)
    with pytest.raises(StoreError, match="newer than this agent knows"):
        Store(db_path).open()


def test_garbage_file_raises_store_error_naming_path(db_path: Path) -> None:
    db_path.parent.mkdir()
    db_path.write_bytes(b"this is not an SQLite database, just garbage\n" * 200)
    s = Store(db_path)
    with pytest.raises(StoreError, match=str(db_path)):
        s.open()
    with pytest.raises(StoreError, match="not open"):
        s.get_meta("k")


def test_closed_store_raises_store_error(db_path: Path) -> None:
    s = Store(db_path)
    with pytest.raises(StoreError, match="not open"):
        s.outbox_put("t", b"x", kind="test")
    s.open()
    s.open()  # idempotent
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="not open"):
        s.outbox_ack(1)


# -- meta, spec sources, deployments --------------------------------------------------


def test_meta_round_trip(store: Store) -> None:
    assert store.get_meta("instance") is None
    store.set_meta("instance", "1")
    store.set_meta("instance", "2")
    assert store.get_meta("instance") == "2"


def test_spec_sources_round_trip(store: Store) -> None:
    store.put_spec_source("fleet", "f1", '{"fleet": 1}')
    store.put_spec_source("node", "f1", '{"node": 1}')
    store.put_spec_source("fleet", "f2", '{"fleet": 2}')
    store.put_spec_source("fleet", "f2", '{"fleet": 3}')
    assert store.get_spec_sources() == {
        "f1": {"fleet": '{"fleet": 1}', "node": '{"node": 1}'},
        "f2": {"fleet": '{"fleet": 3}'},
    }
    store.put_spec_source("node", "f1", None)
    store.put_spec_source("fleet", "f2", None)
    store.put_spec_source("node", "never-seen", None)
    assert store.get_spec_sources() == {"f1": {"fleet": '{"fleet": 1}'}}
    with pytest.raises(ValueError, match="scope"):
        store.put_spec_source("cluster", "f1", "{}")


def test_deployments_round_trip(store: Store) -> None:
    assert store.get_deployment("f1") is None
    plain = deployment(
        "f2",
        state="active",
        error_json=None,
        active_version=None,
        active_code_dir=None,
        active_spec_json=None,
    )
    store.put_deployment(deployment("f1"))
    store.put_deployment(plain)
    assert store.get_deployment("f1") == deployment("f1")
    assert store.get_deployment("f2") == plain
    updated = deployment("f1", state="active", version="3", updated_ts=1700000100.0)
    store.put_deployment(updated)
    assert store.list_deployments() == [updated, plain]
    assert store.delete_deployment("f1") is True
    assert store.delete_deployment("f1") is False
    assert store.list_deployments() == [plain]


# -- outbox ---------------------------------------------------------------------------


def test_outbox_peek_in_id_order(store: Store) -> None:
    ids = [store.outbox_put(f"t/{n}", b"%d" % n, kind="test") for n in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert [i.topic for i in store.outbox_peek(10)] == [f"t/{n}" for n in range(5)]
    assert [i.id for i in store.outbox_peek(2)] == ids[:2]
    assert [i.id for i in store.outbox_peek(2, after_id=ids[1])] == ids[2:4]
    assert store.outbox_peek(0) == []
    with pytest.raises(ValueError, match="limit"):
        store.outbox_peek(-1)


def test_outbox_item_fields_round_trip(store: Store) -> None:
    item_id = store.outbox_put(
        "edge/nodes/n1/functions/f1/state",
        b"\x00\xffbinary",
        qos=0,
        retain=True,
        kind="function_state",
        key="state/f1",
        ts=123.25,
    )
    [item] = store.outbox_peek(1)
    assert item == OutboxItem(
        item_id,
        "edge/nodes/n1/functions/f1/state",
        b"\x00\xffbinary",
        0,
        True,
        "function_state",
        "state/f1",
        123.25,
    )
    with pytest.raises(ValueError, match="qos"):
        store.outbox_put("t", b"", qos=3, kind="test")


def test_outbox_ids_never_reused(db_path: Path) -> None:
    """Ids keep increasing after the outbox empties, even across a reopen."""
    with Store(db_path) as s:
        first = s.outbox_put("t", b"a", kind="test")
        assert s.outbox_ack(first)
        second = s.outbox_put("t", b"b", kind="test")
        assert second > first
        assert s.outbox_ack(second)
    with Store(db_path) as s:
        assert s.outbox_put("t", b"c", kind="test") > second


def test_supersede_by_key(store: Store) -> None:
    old = store.outbox_put("state/f1", b"deploying", retain=True, kind="state", key="f1")
    other = store.outbox_put("state/f2", b"active", retain=True, kind="state", key="f2")
    plain = store.outbox_put("heartbeat", b"hb", kind="heartbeat")
    new = store.outbox_put("state/f1", b"active!!", retain=True, kind="state", key="f1")
    assert new > plain > other > old
    assert [(i.id, i.payload) for i in store.outbox_peek(10)] == [
        (other, b"active"),
        (plain, b"hb"),
        (new, b"active!!"),
    ]
    assert store.outbox_depth() == (3, len(b"active") + len(b"hb") + len(b"active!!"))
    assert store.outbox_ack(old) is False  # an in-flight superseded item just vanishes


def test_items_without_key_never_superseded(store: Store) -> None:
    store.outbox_put("replies", b"1", kind="reply")
    store.outbox_put("replies", b"1", kind="reply")
    assert store.outbox_depth() == (2, 2)


def test_outbox_full_on_count_drops_nothing(db_path: Path) -> None:
    with Store(db_path, max_messages=3) as s:
        ids = [s.outbox_put("t", b"x", kind="test", key=f"k{n}") for n in range(3)]
        with pytest.raises(OutboxFull, match="3 messages, 3 bytes queued") as info:
            s.outbox_put("t", b"y", kind="test")
        assert info.value.depth == (3, 3)
        # Backpressure, not a fault of the store: `except StoreError` must not catch it.
        assert isinstance(info.value, AgentError) and not isinstance(info.value, StoreError)
        assert OutboxFull is errors.OutboxFull
        assert [i.id for i in s.outbox_peek(10)] == ids
        assert s.outbox_depth() == (3, 3)
        assert s.outbox_ack(ids[0])
        s.outbox_put("t", b"y", kind="test")
        assert s.outbox_depth() == (3, 3)


def test_outbox_full_on_bytes_drops_nothing(db_path: Path) -> None:
    with Store(db_path, max_bytes=10) as s:
        ids = [s.outbox_put("t", b"12345", kind="test") for _ in range(2)]
        with pytest.raises(OutboxFull, match="2 messages, 10 bytes queued"):
            s.outbox_put("t", b"1", kind="test")
        assert [(i.id, i.payload) for i in s.outbox_peek(10)] == [(n, b"12345") for n in ids]
        assert s.outbox_depth() == (2, 10)
        with pytest.raises(OutboxFull):
            s.outbox_put("t", b"x" * 11, kind="test")  # bigger than the bound on its own


def test_supersede_makes_room_in_full_outbox(db_path: Path) -> None:
    """A newer value for a queued key replaces it even when the outbox is at its bound."""
    with Store(db_path, max_messages=2) as s:
        s.outbox_put("t", b"a", kind="test", key="k")
        s.outbox_put("t", b"b", kind="test")
        s.outbox_put("t", b"c", kind="test", key="k")
        assert [i.payload for i in s.outbox_peek(10)] == [b"b", b"c"]


def test_refused_item_does_not_delete_what_it_would_supersede(db_path: Path) -> None:
    """OutboxFull rolls back the supersede delete: the older keyed value stays queued."""
    with Store(db_path, max_bytes=10) as s:
        s.outbox_put("t", b"old", kind="test", key="k")
        with pytest.raises(OutboxFull):
            s.outbox_put("t", b"far too large", kind="test", key="k")
        assert [i.payload for i in s.outbox_peek(10)] == [b"old"]
        assert s.outbox_depth() == (1, 3)


def test_set_limits_below_depth_keeps_items(store: Store) -> None:
    for _ in range(3):
        store.outbox_put("t", b"x", kind="test")
    store.set_limits(max_messages=2)
    assert store.outbox_depth() == (3, 3)
    assert not store.outbox_has_room(0)
    with pytest.raises(OutboxFull):
        store.outbox_put("t", b"x", kind="test")
    store.set_limits(max_messages=10, max_bytes=4)
    assert store.outbox_has_room(1)
    assert not store.outbox_has_room(2)
    with pytest.raises(ValueError):
        store.set_limits(max_bytes=-1)


def test_depth_counters_correct_after_reopen(db_path: Path) -> None:
    with Store(db_path) as s:
        ids = [s.outbox_put("t", b"x" * n, kind="test") for n in range(1, 6)]
        s.outbox_put("t", b"keyed", kind="test", key="k")
        s.outbox_put("t", b"keyed2", kind="test", key="k")
        s.outbox_ack(ids[1])
        s.outbox_ack(ids[3])
        expected = (4, 1 + 3 + 5 + len(b"keyed2"))
        assert s.outbox_depth() == expected
    with Store(db_path) as s:
        assert s.outbox_depth() == expected
        items = s.outbox_peek(100)
        assert (len(items), sum(len(i.payload) for i in items)) == expected


def test_ack_unknown_id_is_false_and_changes_nothing(store: Store) -> None:
    item_id = store.outbox_put("t", b"abc", kind="test")
    assert store.outbox_ack(item_id + 1000) is False
    assert store.outbox_depth() == (1, 3)
    assert store.outbox_ack(item_id) is True
    assert store.outbox_ack(item_id) is False
    assert store.outbox_depth() == (0, 0)


# -- dedupe and record_reply ----------------------------------------------------------


def test_dedupe_round_trip_and_prune(store: Store) -> None:
    assert store.dedupe_get("r1") is None
    store.dedupe_put("r1", "edge/replies", b"one", 100.0)
    store.dedupe_put("r2", "custom/reply", b"two", 200.0)
    store.dedupe_put("r3", "edge/replies", b"three", 300.0)
    store.dedupe_put("r1", "edge/replies", b"one again", 150.0)
    assert store.dedupe_get("r1") == DedupeEntry("edge/replies", b"one again", 150.0)
    assert store.dedupe_prune(250.0) == 2
    assert store.dedupe_get("r1") is None
    assert store.dedupe_get("r2") is None
    assert store.dedupe_get("r3") == DedupeEntry("edge/replies", b"three", 300.0)
    assert store.dedupe_prune(250.0) == 0


def test_record_reply_queues_and_remembers(store: Store) -> None:
    item_id = store.record_reply("r1", "edge/nodes/n1/replies", b'{"ok":true}', ts=5.0)
    [item] = store.outbox_peek(10)
    assert (item.id, item.kind, item.qos, item.retain) == (item_id, "reply", 1, False)
    assert (item.topic, item.payload, item.created_ts) == (
        "edge/nodes/n1/replies",
        b'{"ok":true}',
        5.0,
    )
    assert store.dedupe_get("r1") == DedupeEntry("edge/nodes/n1/replies", b'{"ok":true}', 5.0)
    assert store.outbox_depth() == (1, len(b'{"ok":true}'))


def test_record_reply_into_full_outbox_remembers_nothing(db_path: Path) -> None:
    """When the reply cannot be queued the request must not be marked as answered."""
    with Store(db_path, max_messages=1) as s:
        s.outbox_put("t", b"x", kind="test")
        with pytest.raises(OutboxFull):
            s.record_reply("r1", "edge/replies", b"reply", ts=1.0)
        assert s.dedupe_get("r1") is None
        assert s.outbox_depth() == (1, 1)


def test_threads_share_one_store(store: Store) -> None:
    """Concurrent writers from several threads get unique ids and consistent counters."""
    errors: list[BaseException] = []
    ids: list[int] = []
    ids_lock = threading.Lock()

    def writer(n: int) -> None:
        try:
            mine = [
                store.record_reply(f"r{n}-{i}", "replies", b"abcd", ts=float(i)) for i in range(100)
            ]
            acked = [store.outbox_ack(i) for i in mine[::2]]
            assert all(acked)
            with ids_lock:
                ids.extend(mine[1::2])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.outbox_depth() == (200, 800)
    assert [i.id for i in store.outbox_peek(1000)] == sorted(ids)


# -- durability -----------------------------------------------------------------------

CHILD = """
import os, signal, sys
from agent.store import Store

store = Store(sys.argv[1], durability=sys.argv[2])
store.open()
for n in range(50):
    store.outbox_put(f"t/{n}", b"payload %d" % n, kind="test", ts=float(n))
store.record_reply("r-last", "replies", b"last", ts=50.0)
store.set_meta("child", "done")
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_committed_outbox_survives_sigkill(db_path: Path, durability: str) -> None:
    """Every item committed before the agent is SIGKILLed is there after restart."""
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(db_path), durability],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    # Killed before close: the commits are only in the WAL, which the reopen must recover.
    assert os.path.getsize(f"{db_path}-wal") > 0
    with Store(db_path) as s:
        assert s.get_meta("child") == "done"
        items = s.outbox_peek(100)
        assert [i.topic for i in items] == [*(f"t/{n}" for n in range(50)), "replies"]
        assert [i.payload for i in items[:50]] == [b"payload %d" % n for n in range(50)]
        assert s.outbox_depth() == (51, sum(len(i.payload) for i in items))
        assert s.dedupe_get("r-last") == DedupeEntry("replies", b"last", 50.0)
