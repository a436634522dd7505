"""The in-memory filter in front of the dedupe table (agent/store/seen.py, agent/store/dedupe.py):
never a false negative (an id whose row is in the table is always looked up), a bounded
false-positive rate, generations dropped only once the prune deleted their rows, and a new
request id answered without any SQL. Real SQLite files in tmp_path."""

from __future__ import annotations

import math
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.contract import protocol
from agent.errors import OutboxFull, StoreError
from agent.store import ReplyRecord, Store, SyncJob
from agent.store.seen import SeenFilter

TS = 28_333_333 * 60.0  # a wall-clock ts (Nov 2023) on a bucket boundary
GEN_BYTES = (1 << 20) // 8


def new_ids(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(128):032x}" for _ in range(n)]


# -- the filter alone ----------------------------------------------------------------------


def test_nothing_is_allocated_before_the_first_add() -> None:
    seen = SeenFilter()
    assert seen.generations() == [] and seen.nbytes == 0
    assert not seen.might_contain("r1")
    seen.add("r1", TS + 5)
    assert seen.generations() == [int(TS // 60)] and seen.nbytes == GEN_BYTES
    assert seen.might_contain("r1")


@pytest.mark.parametrize("max_generations", [16, 4])
def test_no_false_negatives_across_many_generations(max_generations: int) -> None:
    """200k ids over 40 generations (ts one minute apart); with a bound of 4 generations
    the older ones are merged into newer ones and must stay found all the same."""
    seen = SeenFilter(max_generations=max_generations)
    ids = new_ids(200_000, seed=1)
    rng = random.Random(2)
    stamped = [(rid, TS + rng.uniform(0, 40 * 60)) for rid in ids]
    for rid, ts in stamped:
        seen.add(rid, ts)
    assert len(seen.generations()) <= max_generations
    assert all(seen.might_contain(rid) for rid in ids)
    # ...and once the oldest ten minutes are pruned, every younger id is still there.
    cut = TS + 10 * 60
    seen.forget_before(cut)
    assert all(seen.might_contain(rid) for rid, ts in stamped if ts >= cut)


def test_false_positive_rate_at_60k_ids_per_generation() -> None:
    """k = 3, m = 2**20 bits, n = 60k: theory (1 - e**(-kn/m))**k = 0.39% per generation;
    the agent's default window (600 s, pruned every 60 s) keeps up to 11 generations:
    1 - (1 - 0.0039)**11 = 4.2% of new ids then still take the query."""
    seen = SeenFilter()
    for rid in new_ids(60_000, seed=3):
        seen.add(rid, TS)
    probes = new_ids(200_000, seed=4)
    one = sum(map(seen.might_contain, probes)) / len(probes)
    for g in range(1, 11):
        for rid in new_ids(60_000, seed=100 + g):
            seen.add(rid, TS + g * 60)
    assert len(seen.generations()) == 11
    eleven = sum(map(seen.might_contain, probes)) / len(probes)
    print(f"false positives at 60k ids per generation: {one:.3%} (1), {eleven:.2%} (11)")
    assert one < 0.006
    assert eleven < 0.055


def test_forget_before_drops_only_generations_entirely_older_than_the_cut() -> None:
    seen = SeenFilter()
    g0 = int(TS // 60)
    last = {g: f"last-{g}" for g in range(10)}
    for g in range(10):  # ten generations; in each, an id at its first and at its last ts
        seen.add(f"first-{g}", TS + g * 60)
        seen.add(last[g], TS + g * 60 + 59.999)
    assert seen.generations() == [g0 + g for g in range(10)]
    seen.forget_before(TS + 5 * 60 - 0.001)  # generation 4 still holds a row at or above it
    assert seen.generations() == [g0 + g for g in range(4, 10)]
    seen.forget_before(TS + 5 * 60)  # now every ts in generation 4 is below the cut
    assert seen.generations() == [g0 + g for g in range(5, 10)]
    assert all(seen.might_contain(last[g]) for g in range(5, 10))
    assert all(seen.might_contain(f"first-{g}") for g in range(5, 10))


def test_a_bucket_boundary_ts_belongs_to_the_later_generation() -> None:
    """The drop rule relies on every ts of generation g being below (g + 1) * bucket_s."""
    seen = SeenFilter()
    edge = TS + 60
    seen.add("below", math.nextafter(edge, 0.0))  # the float just below the boundary
    seen.add("at", edge)
    g0 = int(TS // 60)
    assert seen.generations() == [g0, g0 + 1]
    seen.forget_before(edge)  # the prune deletes "below" (ts < edge) and keeps "at"
    assert seen.generations() == [g0 + 1]
    assert seen.might_contain("at")


def test_the_memory_bound_merges_and_never_loses_an_id() -> None:
    seen = SeenFilter(max_generations=4)
    stamped = [(f"r{i}", TS + i * 60.0) for i in range(20)]
    for rid, ts in stamped:
        seen.add(rid, ts)
    assert len(seen.generations()) == 4 and seen.nbytes == 4 * GEN_BYTES
    seen.add("late", TS + 60.0)  # older than every generation: into the oldest newer one
    assert len(seen.generations()) == 4
    assert all(seen.might_contain(rid) for rid, _ in stamped) and seen.might_contain("late")
    for cut in (TS + 17 * 60, TS + 18 * 60, TS + 19 * 60):
        seen.forget_before(cut)
        assert all(seen.might_contain(rid) for rid, ts in stamped if ts >= cut)


def test_a_ts_that_is_not_a_finite_number_is_kept() -> None:
    seen = SeenFilter()
    seen.add("forever", float("inf"))
    seen.add("nan", float("nan"))
    seen.add("huge", 1e300)
    for cut in (TS, 1e300, float("inf")):  # DELETE ... WHERE ts < cut keeps ts = inf
        seen.forget_before(cut)
        assert seen.might_contain("forever") and seen.might_contain("nan")


def test_disabled_means_maybe_and_replace_starts_from_the_rows() -> None:
    seen = SeenFilter()
    seen.add("r1", TS)
    seen.disable()
    assert not seen.enabled and seen.nbytes == 0
    assert seen.might_contain("anything")
    seen.add("r2", TS)  # the store is closed: ignored, the next fill reads the table
    assert seen.nbytes == 0
    seen.replace([("r3", TS), ("r4", TS + 600)])
    assert seen.enabled and seen.might_contain("r3") and seen.might_contain("r4")
    assert len(seen.generations()) == 2
    seen.clear()
    assert seen.generations() == [] and not seen.might_contain("r3")


# -- through the store -----------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db") as s:
        yield s


class Statements:
    """Every SQL statement the store's connection runs (sqlite3's trace callback)."""

    def __init__(self, store: Store) -> None:
        self.sql: list[str] = []
        assert store.db.conn is not None
        store.db.conn.set_trace_callback(self.sql.append)

    def dedupe_reads(self) -> int:
        return sum("FROM dedupe WHERE" in s for s in self.sql)


def remember_by_every_path(store: Store, ts: float) -> list[str]:
    """One request id written by each path that writes a dedupe row; their ids."""
    store.dedupe_put("by-put", "t/r", b"1", ts)
    store.record_reply("by-record-reply", "t/r", b"2", ts=ts)
    store.record_replies(
        [("by-record-replies", "t/r", b"3", None), (None, "t/r", b"x", None)], ts=ts
    )
    store.sync_commit(
        {"a": 1},
        delta_topic="edge/n1/sync/delta",
        encode_delta=protocol.encode_sync_delta,
        coalesce_after_id=0,
        reply=ReplyRecord("by-sync-commit", "t/r", b"4", ts),
    )
    store.sync_persist(
        [SyncJob({}, ReplyRecord("by-sync-persist", "t/r", b"5", ts), 0, "")],
        delta_topic="edge/n1/sync/delta",
        encode_delta=protocol.encode_sync_delta,
        coalesce_after_id=0,
    )
    return ["by-put", "by-record-reply", "by-record-replies", "by-sync-commit", "by-sync-persist"]


def test_every_write_path_is_found(store: Store) -> None:
    for n, rid in enumerate(remember_by_every_path(store, TS), start=1):
        entry = store.dedupe_get(rid)
        assert entry is not None and entry.reply == str(n).encode(), rid


def test_a_new_id_is_answered_without_sql(store: Store) -> None:
    remember_by_every_path(store, TS)
    statements = Statements(store)
    probes = new_ids(1000, seed=5)
    assert all(store.dedupe_get(rid) is None for rid in probes)
    # 5 ids in one generation: a false positive is ~1e-12 per probe
    assert statements.dedupe_reads() == 0
    assert store.dedupe_get("by-put") is not None
    assert statements.dedupe_reads() == 1  # the trace sees the query when there is one


def test_a_write_that_rolls_back_is_not_found(tmp_path: Path) -> None:
    """Its id went into the filter before the transaction failed: a false positive, which
    SQL answers."""
    with Store(tmp_path / "state.db", max_messages=1) as store:
        store.record_reply("r1", "t/r", b"1", ts=TS)
        with pytest.raises(OutboxFull):
            store.record_reply("r2", "t/r", b"2", ts=TS)
        assert store.dedupe_get("r2") is None
        assert store.dedupe_get("r1") is not None


def test_prune_forgets_the_old_ids_and_keeps_the_recent_ones(store: Store) -> None:
    old = [f"old-{i}" for i in range(50)]
    recent = [f"recent-{i}" for i in range(50)]
    store.record_replies([(rid, "t/r", b"o", None) for rid in old], ts=TS)
    store.record_replies([(rid, "t/r", b"r", None) for rid in recent], ts=TS + 600)
    assert store.dedupe_prune(TS + 300) == 50
    assert all(store.dedupe_get(rid) is None for rid in old)
    assert all(store.dedupe_get(rid) is not None for rid in recent)
    # the generation of the old ones is gone: only the recent one is left
    assert store._dedupe.seen.generations() == [int((TS + 600) // 60)]


def test_a_prune_that_fails_keeps_every_id(store: Store) -> None:
    """The generations go only once the DELETE committed: here it cannot even start
    (another connection holds the write lock; no busy wait)."""
    old = [f"old-{i}" for i in range(50)]
    store.record_replies([(rid, "t/r", b"o", None) for rid in old], ts=TS)
    assert store.db.conn is not None
    store.db.conn.execute("PRAGMA busy_timeout = 0")
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="dedupe_prune"):
            store.dedupe_prune(TS + 600)
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert all(store.dedupe_get(rid) is not None for rid in old)
    assert store.dedupe_prune(TS + 600) == 50
    assert all(store.dedupe_get(rid) is None for rid in old)


def test_a_reopened_store_finds_what_it_wrote(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    store.open()
    ids = remember_by_every_path(store, TS)
    store.close()
    with pytest.raises(StoreError, match="not open"):  # closed: no answer from memory
        store.dedupe_get("never-seen")
    store.open()  # the same Store again (as after a fault), then a new one (a restart)
    assert all(store.dedupe_get(rid) is not None for rid in ids)
    store.close()
    with Store(path) as again:
        assert all(again.dedupe_get(rid) is not None for rid in ids)
        again.dedupe_put("after-restart", "t/r", b"6", TS + 60)
        assert again.dedupe_get("after-restart") is not None


def test_rows_written_before_open_are_loaded(tmp_path: Path) -> None:
    """A database an older agent (without the filter) wrote: its rows are found."""
    path = tmp_path / "state.db"
    with Store(path):
        pass  # the schema
    ids = new_ids(5000, seed=6)
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO dedupe (request_id, reply_topic, reply, ts) VALUES (?, 't/r', ?, ?)",
            [(rid, rid.encode(), TS + i * 0.25) for i, rid in enumerate(ids)],
        )
    conn.close()
    with Store(path) as store:
        for rid in ids:
            entry = store.dedupe_get(rid)
            assert entry is not None and entry.reply == rid.encode()


def test_a_committed_id_is_found_while_another_thread_writes(store: Store) -> None:
    """record_replies on a thread, its ts moving a minute every other batch (generations are
    created, merged past 16 and dropped by prunes while the main thread reads), while the
    main thread asks for ids already committed: never None, unless a prune announced before
    the lookup could have deleted the row."""
    committed: list[tuple[str, float]] = []
    cut = [TS - 1]  # the newest prune's cut, set before that prune starts
    enough = threading.Event()  # the reader has done its lookups
    # The reader made a lookup since the writer last looked: each batch waits for one, so a
    # starved reader (a busy machine, the GIL) cannot let the writer run out of batches.
    progressed = threading.Event()
    failure: list[BaseException] = []

    def write() -> None:
        try:
            batch = 0
            while batch < 200 or (not enough.is_set() and batch < 20_000):
                ts = TS + batch * 30
                rids = [f"b{batch}-{i}" for i in range(20)]
                store.record_replies([(rid, "t/r", b"r", None) for rid in rids], ts=ts)
                committed.extend((rid, ts) for rid in rids)  # once the commit returned
                if batch % 50 == 49:
                    cut[0] = ts - 40 * 30
                    store.dedupe_prune(cut[0])
                    store.outbox_ack_many([i.id for i in store.outbox_peek(10_000)])
                batch += 1
                progressed.wait(10)
                progressed.clear()
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    writer = threading.Thread(target=write, name="record-replies")
    writer.start()
    rng = random.Random(7)
    checks = pruned = 0
    try:
        while writer.is_alive():
            known = len(committed)
            if not known:
                continue
            live = min(known - 1, max(0, math.ceil((cut[0] - TS) / 30) * 20))  # not pruned
            for rid, ts in (committed[known - 1], committed[rng.randrange(live, known)]):
                if store.dedupe_get(rid) is None:
                    assert ts < cut[0], f"{rid} (ts {ts}) committed, not pruned, not found"
                    pruned += 1
                checks += 1
            progressed.set()
            if checks >= 5000:
                enough.set()
    finally:
        enough.set()
        writer.join()
    assert not failure, failure
    print(f"{checks} lookups of committed ids while writing ({pruned} pruned meanwhile)")
    assert checks >= 5000
    alive = [rid for rid, ts in committed if ts >= cut[0]]
    assert alive and all(store.dedupe_get(rid) is not None for rid in alive)
    assert 1 < len(store._dedupe.seen.generations()) <= 16


def test_what_a_new_id_costs(tmp_path: Path) -> None:
    """Not a timed assertion: the numbers are printed (pytest -s) for the record."""
    path = tmp_path / "state.db"
    with Store(path):
        pass
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO dedupe (request_id, reply_topic, reply, ts) VALUES (?, 't/r', x'00', ?)",
            [(uuid.uuid4().hex, TS + i * 0.006) for i in range(100_000)],
        )
    conn.close()
    started = time.perf_counter()
    with Store(path) as store:
        opened = time.perf_counter() - started
        probes = new_ids(20_000, seed=8)
        seen = store._dedupe.seen

        def per_call() -> float:
            t = time.perf_counter_ns()
            for rid in probes:
                store.dedupe_get(rid)
            return (time.perf_counter_ns() - t) / len(probes)

        with_filter = min(per_call() for _ in range(3))
        kept = seen._bits
        seen._bits = None  # as if disabled: every id goes to SQLite, as before the filter
        try:
            without = min(per_call() for _ in range(3))
        finally:
            seen._bits = kept
    print(
        f"open with 100k dedupe rows: {opened * 1e3:.0f} ms; dedupe_get of a new id: "
        f"{with_filter:.0f} ns with the filter, {without:.0f} ns without"
    )


def test_a_store_without_the_filter_loads_nothing_and_still_finds_every_id(
    tmp_path: Path,
) -> None:
    """``edge-agent status`` opens the store with ``dedupe_filter=False``: no load at open
    (it never looks a request up), and a lookup still answers from the table."""
    path = tmp_path / "state.db"
    with Store(path) as store:
        store.dedupe_put("r1", "t", b"x", time.time())
    with Store(path, dedupe_filter=False) as reader:
        assert reader._dedupe.seen.might_contain("never-seen")  # disabled: all go to SQL
        assert reader.dedupe_get("r1") is not None
        assert reader.dedupe_get("never-seen") is None
