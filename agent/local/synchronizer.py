"""``EdgeSynchronizer``: the seed's edge<->cloud state sync API, with what it got wrong fixed.

- Copy on write: the caller's dict is never aliased (``SyncState.from_data`` deep-copies and
  ``get_local_state`` returns a copy).
- ``apply_remote`` verifies the checksum and only takes a strictly newer version.
- Pending entries carry a real delta (``changes``: changed keys to new values, deleted keys
  to ``None``) between consecutive versions, ready for ``sync/delta`` on the wire.
- Handler write sets (:meth:`EdgeSynchronizer.apply_changes`) get the daemon's optimistic
  check: given the version the invocation read, a change to a key it read or wrote since
  then raises StateConflict and writes nothing (:mod:`agent.contract.statecheck`).

:class:`EdgeSynchronizer` is the seed's class, name and constructor unchanged; it keeps what
both kinds of state share (``None`` values are absent, a remote state's checksum is checked)
and hands the rest to one of two backends chosen by its constructor: :class:`InMemorySync`
(no ``store``: the seed's behaviour) or :class:`StoredSync` (``store``: SQLite, as the
daemon keeps it). The delta algebra is :mod:`agent.contract.sync`'s, shared with the cloud.

Must never: import :mod:`agent.edge` or :mod:`agent.cloud`; touch the store before first use.
"""

from __future__ import annotations

import copy
import json
import threading
from typing import Any

from agent.contract import protocol
from agent.contract.statecheck import ChangeVersions, conflict_message
from agent.contract.sync import apply_delta, compute_delta
from agent.errors import StateConflict
from agent.models import SyncState, canonical_json
from agent.store import Store, SyncCommit

#: Never coalesce: the seed API lists one pending entry per update.
_NO_COALESCING = 1 << 62
_LOCAL_DELTA_TOPIC = "local/sync/delta"


class EdgeSynchronizer:
    """Synchronize state between edge and cloud.

    In memory by default (the seed's behaviour, with its bugs fixed). With ``store`` (an
    :class:`agent.store.Store`, opened on first use), the state, its version and the pending
    deltas live in SQLite exactly as the daemon keeps them: they survive restarts, and
    pending changes are the outbox's queued ``sync/delta`` messages.
    """

    def __init__(self, store: Store | None = None) -> None:
        self._backend: InMemorySync | StoredSync = (
            InMemorySync() if store is None else StoredSync(store)
        )

    def get_local_state(self) -> SyncState | None:
        """A copy of the current local state (None before the first update)."""
        return self._backend.get_local_state()

    def update_local(self, data: dict[str, Any]) -> SyncState:
        """Replace the local state with ``data`` as the next version; queue its delta.

        A key whose value is ``None`` is absent: on the wire ``null`` means "deleted", so
        storing it would give the cloud a document with a different checksum.
        """
        return self._backend.update_local({k: v for k, v in data.items() if v is not None})

    def apply_changes(
        self,
        changes: dict[str, Any],
        *,
        base_version: int | None = None,
        checked: list[str] | None = None,
        read_all: bool = False,
    ) -> SyncState | None:
        """Apply a handler's write set (None deletes) as the next version; None if no-op.

        Atomic against concurrent write sets: each is applied to the latest state, never
        to a copy another invocation has since replaced. With ``base_version`` (the
        version the handler read), StateConflict is raised and nothing is written when a
        key in ``checked`` (default: the written keys), or with ``read_all`` any key,
        changed after it.
        """
        return self._backend.apply_changes(changes, base_version, checked, read_all)

    def context_input(self) -> tuple[int, dict[str, Any]]:
        """(version, data) for an invocation's ``context.state``: read-only, not a copy."""
        return self._backend.context_input()

    def apply_remote(self, state: SyncState) -> bool:
        """Take a remote state if it is strictly newer and its checksum is right."""
        if not state.verify():
            return False
        return self._backend.apply_remote(state)

    def get_pending_changes(self) -> list[dict[str, Any]]:
        """Changes to sync to remote (a copy)."""
        return self._backend.get_pending_changes()

    def confirm_sync(self, up_to_version: int) -> None:
        """Drop pending changes up to and including ``up_to_version``."""
        self._backend.confirm_sync(up_to_version)

    def close(self) -> None:
        self._backend.close()


class InMemorySync:
    """The state, its version, the pending deltas and the key versions in this process.

    Every method takes the one lock; :meth:`EdgeSynchronizer.update_local` has already
    dropped ``None`` values and :meth:`EdgeSynchronizer.apply_remote` checked the checksum.
    """

    def __init__(self) -> None:
        self._local_state: SyncState | None = None
        self._pending_changes: list[dict[str, Any]] = []
        self._changes = ChangeVersions()
        self._lock = threading.Lock()

    def get_local_state(self) -> SyncState | None:
        with self._lock:
            return copy.deepcopy(self._local_state)

    def update_local(self, data: dict[str, Any]) -> SyncState:
        with self._lock:
            return self._update(data)

    def _update(self, data: dict[str, Any]) -> SyncState:
        """The next version; the caller holds ``self._lock``."""
        before = self._local_state.data if self._local_state else {}
        version = (self._local_state.version if self._local_state else 0) + 1
        state = SyncState.from_data(data, version)
        self._local_state = state
        changes = compute_delta(before, state.data)
        self._changes.record(version, changes, len(state.data))
        self._pending_changes.append(
            {
                "type": "update",
                "version": version,
                "from_version": version - 1,
                "data": copy.deepcopy(state.data),
                "changes": changes,
                "checksum": state.checksum,
            }
        )
        return copy.deepcopy(state)

    def apply_changes(
        self,
        changes: dict[str, Any],
        base_version: int | None,
        checked: list[str] | None,
        read_all: bool,
    ) -> SyncState | None:
        with self._lock:
            if base_version is not None:
                keys = list(changes) if checked is None else checked
                conflicts = self._changes.conflicts(base_version, keys, read_all)
                if conflicts:
                    raise StateConflict(conflict_message(conflicts, base_version), keys=conflicts)
            before = self._local_state.data if self._local_state else {}
            after = apply_delta(before, changes)
            if canonical_json(after) == canonical_json(before):
                return None
            return self._update(after)

    def context_input(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            state = self._local_state
            return (state.version, state.data) if state else (0, {})

    def apply_remote(self, state: SyncState) -> bool:
        with self._lock:
            if self._local_state is not None and state.version <= self._local_state.version:
                return False
            before = self._local_state.data if self._local_state else {}
            self._local_state = SyncState.from_data(state.data, state.version)
            self._changes.record(state.version, compute_delta(before, state.data), len(state.data))
            return True

    def get_pending_changes(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._pending_changes)

    def confirm_sync(self, up_to_version: int) -> None:
        with self._lock:
            self._pending_changes = [
                c for c in self._pending_changes if c["version"] > up_to_version
            ]

    def close(self) -> None:
        """Nothing to release."""


class StoredSync:
    """The state, its version and the pending deltas in a :class:`agent.store.Store`.

    The store is opened on first use and closed by :meth:`close`; pending changes are its
    outbox's ``sync_delta`` items, one per update (never coalesced). Every method takes
    the one lock.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._open = False
        self._lock = threading.Lock()

    def _db(self) -> Store:
        """The store, opened on first use; the caller holds ``self._lock``."""
        if not self._open:
            self._store.open()
            self._open = True
        return self._store

    def get_local_state(self) -> SyncState | None:
        with self._lock:
            version, data = self._db().sync_state()
            return SyncState.from_data(data, version) if version else None

    def update_local(self, data: dict[str, Any]) -> SyncState:
        with self._lock:
            db = self._db()
            version, before = db.sync_state()
            commit = _commit(db, compute_delta(before, data))
            if commit is None:  # nothing changed: the seed still made a new version
                db.sync_raise_version(version + 1)
            version, after = db.sync_state()
            return SyncState.from_data(after, version)

    def apply_changes(
        self,
        changes: dict[str, Any],
        base_version: int | None,
        checked: list[str] | None,
        read_all: bool,
    ) -> SyncState | None:
        with self._lock:
            db = self._db()
            if _commit(db, changes, base_version, checked, read_all) is None:
                return None
            version, data = db.sync_state()
            return SyncState.from_data(data, version)

    def context_input(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            return self._db().sync_view()

    def apply_remote(self, state: SyncState) -> bool:
        with self._lock:
            db = self._db()
            version, before = db.sync_state()
            if version and state.version <= version:
                return False
            db.sync_raise_version(state.version - 1)
            commit = _commit(db, compute_delta(before, state.data))
            if commit is None:
                db.sync_raise_version(state.version)
            else:  # the cloud's own state is not a change to send back to it
                db.outbox_ack(commit.delta_id)
            return True

    def get_pending_changes(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"type": "update", "version": delta["to_version"], **delta}
                for _, delta in _stored_deltas(self._db())
            ]

    def confirm_sync(self, up_to_version: int) -> None:
        with self._lock:
            db = self._db()
            for item_id, delta in _stored_deltas(db):
                if delta["to_version"] <= up_to_version:
                    db.outbox_ack(item_id)

    def close(self) -> None:
        if self._open:
            self._store.close()
            self._open = False


def _commit(
    db: Store,
    changes: dict[str, Any],
    base_version: int | None = None,
    checked: list[str] | None = None,
    read_all: bool = False,
) -> SyncCommit | None:
    """Commit a change set the way local mode does: one pending delta per update."""
    return db.sync_commit(
        changes,
        delta_topic=_LOCAL_DELTA_TOPIC,
        encode_delta=protocol.encode_sync_delta,
        coalesce_after_id=_NO_COALESCING,
        base_version=base_version,
        checked=checked,
        read_all=read_all,
    )


def _stored_deltas(db: Store) -> list[tuple[int, dict[str, Any]]]:
    """(outbox id, delta) of every pending delta, in order."""
    return [
        (item.id, json.loads(item.payload))
        for item in db.outbox_peek(1 << 30)
        if item.kind == "sync_delta"
    ]
