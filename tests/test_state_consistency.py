"""Handler state consistency in one process: the optimistic check, local mode under threads,
and a property test of any interleaving.

What is pinned (docs/protocol.md, *Consistency of handler state*): an invocation reads the
state as of when it started executing; its write set commits only if no key it read or wrote
changed since then, else it fails with ``conflict`` and writes nothing. So the commits that
are accepted are equivalent to running those invocations one at a time in commit order, and
no conflict is raised without a reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from procutil import run_threads

from agent import EdgeFunction, EdgeNode, EdgeRuntime, EdgeSynchronizer
from agent.contract.statecheck import WHOLE_DOCUMENT, ChangeVersions
from agent.edge.statesync import StateSync
from agent.errors import Overloaded, StateConflict, StoreError, error_from_dict, error_to_dict
from agent.store import Store

# -- the check itself -------------------------------------------------------------------------


def test_change_versions_flag_only_keys_changed_after_the_snapshot() -> None:
    changes = ChangeVersions()
    changes.record(1, ["a"], live_keys=1)
    changes.record(2, ["b"], live_keys=2)
    assert changes.conflicts(1, ["a"], read_all=False) == []
    assert changes.conflicts(1, ["a", "b", "c"], read_all=False) == ["b"]
    assert changes.conflicts(0, ["b", "a"], read_all=False) == ["a", "b"]
    assert changes.conflicts(1, [], read_all=True) == [WHOLE_DOCUMENT]
    assert changes.conflicts(2, [], read_all=True) == []


def test_change_versions_stay_bounded_and_conservative() -> None:
    """Forgetting old deletions must never hide a change: older snapshots conflict instead."""
    changes = ChangeVersions()
    for version in range(1, 5000):
        changes.record(version, [f"gone-{version}"], live_keys=0)
    assert len(changes._by_key) <= 1024 + 1
    assert changes.conflicts(10, ["gone-3000"], read_all=False) == ["gone-3000"]
    assert changes.conflicts(4999, ["gone-3000"], read_all=False) == []


def test_conflict_crosses_the_wire_with_its_keys() -> None:
    wire = error_to_dict(StateConflict("changed", keys=["count"]))
    assert wire == {"type": "conflict", "message": "changed", "keys": ["count"]}
    back = error_from_dict(wire)
    assert isinstance(back, StateConflict) and back.keys == ["count"]


# -- the synchronizer, in memory and on a store ------------------------------------------------


@pytest.fixture(params=["memory", "store"])
def sync(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EdgeSynchronizer]:
    s = (
        EdgeSynchronizer(Store(tmp_path / "state.db"))
        if request.param == "store"
        else (EdgeSynchronizer())
    )
    yield s
    s.close()


def test_stale_write_is_refused_and_writes_nothing(sync: EdgeSynchronizer) -> None:
    """Two invocations read version 1; the second to commit its increment lost the first's."""
    sync.apply_changes({"count": 1})
    base, _ = sync.context_input()
    sync.apply_changes({"count": 2}, base_version=base, checked=["count"])
    with pytest.raises(StateConflict) as info:
        sync.apply_changes({"count": 2}, base_version=base, checked=["count"])
    assert info.value.keys == ["count"] and info.value.type == "conflict"
    state = sync.get_local_state()
    assert state is not None and (state.version, state.data) == (2, {"count": 2})
    assert len(sync.get_pending_changes()) == 2


def test_disjoint_keys_commit_from_the_same_snapshot(sync: EdgeSynchronizer) -> None:
    base, _ = sync.context_input()
    sync.apply_changes({"a": 1}, base_version=base, checked=["a"])
    sync.apply_changes({"b": 1}, base_version=base, checked=["b"])
    state = sync.get_local_state()
    assert state is not None and state.data == {"a": 1, "b": 1}


def test_a_read_key_changed_by_another_conflicts_even_when_not_written(
    sync: EdgeSynchronizer,
) -> None:
    """Write skew: it read "limit", wrote "used"; "limit" changed meanwhile."""
    sync.apply_changes({"limit": 5})
    base, _ = sync.context_input()
    sync.apply_changes({"limit": 1}, base_version=base, checked=["limit"])
    with pytest.raises(StateConflict) as info:
        sync.apply_changes({"used": 4}, base_version=base, checked=["limit", "used"])
    assert info.value.keys == ["limit"]


def test_listing_the_document_conflicts_with_any_change(sync: EdgeSynchronizer) -> None:
    base, _ = sync.context_input()
    sync.apply_changes({"other": 1}, base_version=base, checked=["other"])
    with pytest.raises(StateConflict) as info:
        sync.apply_changes({"mine": 1}, base_version=base, checked=["mine"], read_all=True)
    assert info.value.keys == [WHOLE_DOCUMENT]


def test_a_deleted_key_counts_as_changed(sync: EdgeSynchronizer) -> None:
    sync.apply_changes({"k": 1})
    base, _ = sync.context_input()
    sync.apply_changes({"k": None}, base_version=base, checked=["k"])
    with pytest.raises(StateConflict):
        sync.apply_changes({"k": 2}, base_version=base, checked=["k"])


# -- local mode with real workers, under threads -----------------------------------------------


def counter(event, context):  # type: ignore[no-untyped-def]
    import time

    n = (context.state.get(event.get("key", "count")) or 0) + 1
    if event.get("delay"):
        time.sleep(event["delay"])
    context.state.set(event.get("key", "count"), n)
    return n


@pytest.fixture(params=["memory", "store"])
def local_runtime(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EdgeRuntime]:
    store = Store(tmp_path / "state.db") if request.param == "store" else None
    sync = EdgeSynchronizer(store)
    with EdgeRuntime(
        EdgeNode(id="gw", name="gw"), synchronizer=sync, max_workers=4, max_queue=64
    ) as runtime:
        yield runtime
    sync.close()


def test_local_burst_with_concurrency_1_counts_1_to_n(local_runtime: EdgeRuntime) -> None:
    """Threads invoking a counter at once got the same state (the seed-API lost update)."""
    local_runtime.deploy(EdgeFunction(id="c", name="c", handler=counter, timeout_seconds=30))
    results = run_threads(24, lambda i: local_runtime.invoke("c", {"delay": 0.01}))
    assert sorted(results) == list(range(1, 25)), results
    state = local_runtime.synchronizer.get_local_state()
    assert state is not None and state.data == {"count": 24}


def test_local_burst_with_concurrency_4_counts_the_ok_ones(local_runtime: EdgeRuntime) -> None:
    fn = EdgeFunction(id="c", name="c", handler=counter, timeout_seconds=30)
    fn.concurrency = 4
    local_runtime.deploy(fn)
    # 200 ms between read and write: on a loaded machine (CI runs beside other suites) the
    # four workers' cold starts spread out, and with 20 ms no two invocations overlapped once.
    results = run_threads(24, lambda i: local_runtime.invoke("c", {"delay": 0.2}))
    ok = sorted(r for r in results if isinstance(r, int))
    conflicts = [r for r in results if isinstance(r, StateConflict)]
    assert ok == list(range(1, len(ok) + 1)) and len(ok) + len(conflicts) == 24, results
    assert conflicts, "4 in parallel over one key with a 200 ms window never conflicted"
    state = local_runtime.synchronizer.get_local_state()
    assert state is not None and state.data == {"count": len(ok)}
    failed = local_runtime.metrics.summary()["error_count"]
    assert failed == len(conflicts)


# -- any interleaving: a property test on the real store ---------------------------------------

KEYS = ["a", "b", "c", "d"]


@dataclass
class Txn:
    """One invocation: reads some keys, writes a function of what it read to others."""

    index: int
    reads: list[str]
    writes: list[str]
    base: int = -1
    seen: dict[str, Any] = field(default_factory=dict)

    def compute(self, state: dict[str, Any]) -> dict[str, Any]:
        """What the handler writes given the state it sees (deterministic, order-sensitive)."""
        total = sum(int(state.get(k) or 0) for k in self.reads)
        return {k: total * 10 + self.index + 1 for k in self.writes}


txns = st.lists(
    st.tuples(
        st.lists(st.sampled_from(KEYS), max_size=3, unique=True),
        st.lists(st.sampled_from(KEYS), min_size=1, max_size=2, unique=True),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(specs=txns, data=st.data())
def test_any_interleaving_equals_the_ok_invocations_run_serially(
    specs: list[tuple[list[str], list[str]]], data: st.DataObject, tmp_path_factory: Any
) -> None:
    """Interleave starts and commits of invocations over overlapping keys at random: the final
    state is the ok ones' write sets applied serially in commit order, each ok one saw exactly
    the state the serial run would have shown it, and every conflict had a cause."""
    path = tmp_path_factory.mktemp("interleave") / "state.db"
    txs = [Txn(i, reads, writes) for i, (reads, writes) in enumerate(specs)]
    events = [("start", t.index) for t in txs] + [("commit", t.index) for t in txs]
    order = data.draw(st.permutations(events))
    # a commit can only follow its own start
    started: set[int] = set()
    schedule = []
    pending: list[tuple[str, int]] = []
    for kind, i in order:
        if kind == "commit" and i not in started:
            pending.append((kind, i))
            continue
        schedule.append((kind, i))
        if kind == "start":
            started.add(i)
            schedule += [p for p in pending if p[1] == i]
            pending = [p for p in pending if p[1] != i]
    with Store(path) as store:
        sync = EdgeSynchronizer(store)
        committed: list[Txn] = []
        conflicted: list[Txn] = []
        history: list[tuple[int, set[str]]] = []  # (version, keys changed) of ok commits
        for kind, i in schedule:
            tx = txs[i]
            if kind == "start":
                tx.base, snapshot = sync.context_input()
                tx.seen = {k: snapshot.get(k) for k in tx.reads}
                continue
            writes = tx.compute(tx.seen)
            try:
                after = sync.apply_changes(
                    writes, base_version=tx.base, checked=sorted({*tx.reads, *tx.writes})
                )
            except StateConflict as exc:
                conflicted.append(tx)
                changed = set().union(*(keys for v, keys in history if v > tx.base))
                assert set(exc.keys) <= changed & {*tx.reads, *tx.writes}, "no cause"
                assert exc.keys, "a conflict must name its keys"
                continue
            committed.append(tx)
            if after is not None:
                changed = sync.get_pending_changes()[-1]["changes"]
                history.append((after.version, set(changed)))
        final = store.sync_state()[1]

    serial: dict[str, Any] = {}
    for tx in committed:
        assert tx.seen == {k: serial.get(k) for k in tx.reads}, "not serializable"
        serial.update(tx.compute(tx.seen))
    assert final == serial
    assert len(committed) + len(conflicted) == len(txs)


# -- the daemon's two steps: apply in memory (worker held), persist in order (group commit) ----


class FailingStore(Store):
    """A real store whose next ``fail`` group commits raise as a full disk would."""

    fail = 0

    def sync_persist(self, *args: Any, **kwargs: Any) -> int:
        if self.fail:
            self.fail -= 1
            raise StoreError("database or disk is full")
        return super().sync_persist(*args, **kwargs)


@pytest.fixture
def statesync(tmp_path: Path) -> Iterator[tuple[StateSync, FailingStore]]:
    from agent.contract import protocol
    from agent.edge.outbox import OutboxPump

    with FailingStore(tmp_path / "state.db") as store:
        sync = StateSync(
            store, protocol.Topics("edge", "gw"), OutboxPump(store, lambda *a: 0), tmp_path / "h"
        )
        sync.boot()
        yield sync, store
        sync.close()


def test_applied_writes_are_read_at_once_and_stored_in_one_transaction(
    statesync: tuple[StateSync, FailingStore],
) -> None:
    """Three invocations apply while holding their workers; one group commit stores all."""
    sync, store = statesync
    tickets = []
    for n in range(1, 4):
        base = sync.current().state_version
        tickets.append(sync.apply({"count": n}, None, base_version=base, checked=["count"]))
        assert sync.current().state == {"count": n}  # the next one reads it at once
    assert store.sync_state() == (0, {})  # nothing on disk yet
    sync.persist(tickets[0])  # the first to get there writes everything applied so far
    assert store.sync_state() == (3, {"count": 3}) and sync.durable_version == 3
    sync.persist(tickets[2])  # already settled: nothing more to do
    deltas = [i for i in store.outbox_peek(10) if i.kind == "sync_delta"]
    assert len(deltas) == 1, "unsent deltas of one batch merge into one"


def test_a_failed_group_commit_undoes_memory_and_fails_its_readers(
    statesync: tuple[StateSync, FailingStore],
) -> None:
    """Writes visible in memory but never stored must not reach anyone as ok."""
    sync, store = statesync
    sync.commit({"count": 1}, None)
    base = sync.current().state_version
    lost = sync.apply({"count": 2}, None, base_version=base, checked=["count"])
    read_version = sync.current().state_version  # a read-only invocation saw count = 2
    store.fail = 1
    with pytest.raises(Overloaded, match="could not be stored"):
        sync.persist(lost)
    with pytest.raises(Overloaded, match="could not be stored"):
        sync.persist_through(read_version)
    assert sync.current().state == {"count": 1} and store.sync_state() == (1, {"count": 1})
    with pytest.raises(StateConflict):  # it read from the undone memory
        sync.apply({"count": 3}, None, base_version=read_version, checked=["count"])
    base = sync.current().state_version
    sync.commit({"count": 2}, None, base_version=base, checked=["count"])
    assert store.sync_state() == (2, {"count": 2})
