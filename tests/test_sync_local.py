"""EdgeSynchronizer and SyncState in one process: copies, versions, deltas, checksums."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import EdgeSynchronizer, SyncState
from agent.contract.sync import apply_delta, compute_delta
from agent.models import state_checksum
from testing.checksum import wire_checksum

# -- SyncState ---------------------------------------------------------------------------------


def test_sync_state_from_data_copies_the_callers_dict() -> None:
    """Mutating the caller's dict (even nested) after from_data does not change the state."""
    data: dict[str, Any] = {"setpoint": 21.5, "zones": {"a": [1, 2]}}
    state = SyncState.from_data(data, version=3)

    data["setpoint"] = 99
    data["zones"]["a"].append(3)
    data["new"] = True

    assert state.data == {"setpoint": 21.5, "zones": {"a": [1, 2]}}
    assert state.version == 3
    assert state.verify()


def test_sync_state_checksum_is_the_wire_checksum() -> None:
    """The checksum is hex SHA-256 of the canonical JSON (sorted keys, compact, UTF-8)."""
    data = {"b": 1, "a": {"name": "Zürich ☃", "list": [1.5, None, True]}}
    state = SyncState.from_data(data, version=1)
    assert state.checksum == wire_checksum(data)
    assert state_checksum(data) == wire_checksum(data)


def test_sync_state_verify_detects_tampering() -> None:
    """verify() is False once data and checksum disagree."""
    state = SyncState.from_data({"a": 1}, version=1)
    state.data["a"] = 2
    assert not state.verify()


# -- EdgeSynchronizer: local updates -----------------------------------------------------------


def test_update_local_bumps_version_and_queues_a_delta() -> None:
    """Each update_local is the next version, with an "update" entry carrying its delta."""
    sync = EdgeSynchronizer()
    assert sync.get_local_state() is None

    s1 = sync.update_local({"a": 1, "b": 2})
    s2 = sync.update_local({"a": 1, "b": 3, "c": 4})
    s3 = sync.update_local({"c": 4})

    assert (s1.version, s2.version, s3.version) == (1, 2, 3)
    pending = sync.get_pending_changes()
    assert [p["type"] for p in pending] == ["update"] * 3
    assert [p["version"] for p in pending] == [1, 2, 3]
    assert [p["from_version"] for p in pending] == [0, 1, 2]
    assert pending[0]["changes"] == {"a": 1, "b": 2}
    assert pending[1]["changes"] == {"b": 3, "c": 4}
    assert pending[2]["changes"] == {"a": None, "b": None}
    assert pending[2]["data"] == {"c": 4}
    assert pending[2]["checksum"] == wire_checksum({"c": 4})
    local = sync.get_local_state()
    assert local is not None and local.version == 3 and local.data == {"c": 4}


def test_update_local_does_not_alias_the_callers_dict() -> None:
    """The caller's dict, the returned state and the local state are independent copies."""
    sync = EdgeSynchronizer()
    data: dict[str, Any] = {"zones": {"a": 1}}
    returned = sync.update_local(data)

    data["zones"]["a"] = 2
    returned.data["zones"]["a"] = 3
    local = sync.get_local_state()
    assert local is not None
    local.data["zones"]["a"] = 4

    again = sync.get_local_state()
    assert again is not None and again.data == {"zones": {"a": 1}}
    assert sync.get_pending_changes()[0]["data"] == {"zones": {"a": 1}}


def test_update_local_with_non_json_data_changes_nothing() -> None:
    """Data that cannot be checksummed is refused and the state and queue stay as they were."""
    sync = EdgeSynchronizer()
    sync.update_local({"a": 1})
    with pytest.raises(TypeError):
        sync.update_local({"a": object()})
    local = sync.get_local_state()
    assert local is not None and local.version == 1 and local.data == {"a": 1}
    assert len(sync.get_pending_changes()) == 1


def test_pending_changes_are_a_copy() -> None:
    """Mutating what get_pending_changes returned does not touch the queue."""
    sync = EdgeSynchronizer()
    sync.update_local({"a": {"b": 1}})
    pending = sync.get_pending_changes()
    pending[0]["data"]["a"]["b"] = 2
    pending[0]["changes"].clear()
    pending.clear()

    again = sync.get_pending_changes()
    assert len(again) == 1
    assert again[0]["data"] == {"a": {"b": 1}} and again[0]["changes"] == {"a": {"b": 1}}


def test_confirm_sync_drops_up_to_and_including_a_version() -> None:
    """confirm_sync(n) drops pending entries with version <= n and keeps the rest."""
    sync = EdgeSynchronizer()
    for i in range(5):
        sync.update_local({"i": i})
    sync.confirm_sync(2)
    assert [p["version"] for p in sync.get_pending_changes()] == [3, 4, 5]
    sync.confirm_sync(2)
    assert [p["version"] for p in sync.get_pending_changes()] == [3, 4, 5]
    sync.confirm_sync(10)
    assert sync.get_pending_changes() == []


def test_concurrent_updates_get_distinct_consecutive_versions() -> None:
    """update_local from many threads never reuses a version."""
    sync = EdgeSynchronizer()

    def work(t: int) -> None:
        for i in range(50):
            sync.update_local({"t": t, "i": i})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [p["version"] for p in sync.get_pending_changes()] == list(range(1, 201))


# -- EdgeSynchronizer: remote states -----------------------------------------------------------


def test_apply_remote_takes_only_strictly_newer_states() -> None:
    """A remote state is taken only when its version is greater than the local one."""
    sync = EdgeSynchronizer()
    assert sync.apply_remote(SyncState.from_data({"r": 1}, version=5)) is True
    assert sync.apply_remote(SyncState.from_data({"r": 2}, version=5)) is False
    assert sync.apply_remote(SyncState.from_data({"r": 3}, version=4)) is False
    assert sync.apply_remote(SyncState.from_data({"r": 4}, version=6)) is True

    local = sync.get_local_state()
    assert local is not None and local.version == 6 and local.data == {"r": 4}
    assert sync.get_pending_changes() == [], "a remote state is not echoed back as a change"


def test_apply_remote_rejects_a_bad_checksum() -> None:
    """A state whose checksum does not match its data is refused, whatever its version."""
    sync = EdgeSynchronizer()
    sync.update_local({"a": 1})
    forged = SyncState(version=9, data={"a": 2}, checksum="0" * 64)
    tampered = SyncState.from_data({"a": 3}, version=10)
    tampered.data["a"] = 4

    assert sync.apply_remote(forged) is False
    assert sync.apply_remote(tampered) is False
    local = sync.get_local_state()
    assert local is not None and local.version == 1 and local.data == {"a": 1}


def test_apply_remote_copies_the_remote_state() -> None:
    """Mutating the remote state object after applying it does not change the local state."""
    sync = EdgeSynchronizer()
    remote = SyncState.from_data({"zones": {"a": 1}}, version=2)
    assert sync.apply_remote(remote)
    remote.data["zones"]["a"] = 2
    local = sync.get_local_state()
    assert local is not None and local.data == {"zones": {"a": 1}}


def test_local_update_after_remote_continues_from_its_version() -> None:
    """After taking remote version 7, the next local update is version 8 with a delta from it."""
    sync = EdgeSynchronizer()
    sync.apply_remote(SyncState.from_data({"a": 1, "b": 2}, version=7))
    state = sync.update_local({"a": 1, "b": 5})
    assert state.version == 8
    (entry,) = sync.get_pending_changes()
    assert entry["from_version"] == 7 and entry["changes"] == {"b": 5}


# -- deltas ------------------------------------------------------------------------------------

# No booleans or floats next to integers here: Python's False == 0 == 0.0 hides changes that
# JSON sees (see test_delta_sees_changes_that_python_equality_hides).
scalars = st.none() | st.integers() | st.text(max_size=5)
nested = st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=3), scalars, max_size=3)
# Top-level values are never None: on the wire a null in ``changes`` means "deleted".
top_level = st.integers() | st.text(max_size=5) | nested
keys = st.sampled_from(["a", "b", "c", "d", "é"])
documents = st.dictionaries(keys, top_level, max_size=5)


@settings(max_examples=150, deadline=None)
@given(before=documents, after=documents)
def test_delta_applied_to_before_gives_after(before: dict[str, Any], after: dict[str, Any]) -> None:
    """compute_delta/apply_delta round-trip, so the receiver's checksum matches the sender's."""
    changes = compute_delta(before, after)
    rebuilt = apply_delta(before, changes)
    assert rebuilt == after
    assert state_checksum(rebuilt) == state_checksum(after)
    assert {k for k, v in changes.items() if v is None} == set(before) - set(after)
    assert all(k not in before or before[k] != v for k, v in changes.items() if v is not None)


def test_delta_of_a_none_value_reproduces_the_checksum() -> None:
    """A state with a top-level None is refused, or its delta still reproduces the checksum."""
    sync = EdgeSynchronizer()
    sync.update_local({"a": 1})
    try:
        sync.update_local({"a": 1, "calibration": None})
    except ValueError:
        return  # refusing what the wire cannot carry is a fine fix
    first, second = sync.get_pending_changes()
    rebuilt = apply_delta(first["data"], second["changes"])
    assert state_checksum(rebuilt) == second["checksum"]


@pytest.mark.parametrize(
    ("old", "new"),
    [(False, 0), (1, True), (1, 1.0), ([1], [True])],
    ids=["F-0", "1-T", "1-1.0", "list"],
)
def test_delta_sees_changes_that_python_equality_hides(old: Any, new: Any) -> None:
    """A value whose JSON changes is in the delta, so the receiver's checksum matches."""
    sync = EdgeSynchronizer()
    sync.update_local({"a": old})
    sync.update_local({"a": new})
    first, second = sync.get_pending_changes()
    rebuilt = apply_delta(first["data"], second["changes"])
    assert state_checksum(rebuilt) == second["checksum"]
