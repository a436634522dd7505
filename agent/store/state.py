"""The synced state's tables: the edge-owned reported document and the cloud's desired one.

Part of the store (still the only package that touches sqlite3): :class:`SyncState` runs
its SQL through the store's :class:`~agent.store.db.Database` and queues its deltas (and
the replies that go with them) through the :class:`~agent.store.outbox.Outbox` and
:class:`~agent.store.dedupe.Dedupe` parts. Its table is created by schema version 2
(:data:`agent.store.db.SYNC_SCHEMA`).

Reported state is a versioned key/value document: one row per top-level key (canonical
JSON), its version in ``meta['sync.version']``. :meth:`SyncState.commit` applies a
change set, bumps the version and queues the ``sync/delta`` in the outbox in ONE
transaction (optionally together with the invocation's reply), so a change and the delta
that reports it are never separated by a crash.

Coalescing: while the newest queued delta has not been handed to MQTT yet (its outbox id is
above ``coalesce_after_id``, which the outbox pump knows), a new change is merged into it
instead of queueing another: offline, a thousand changes to one key become one delta
``{from_version: first, to_version: last, changes: {key: final value}}``. The outbox pump
claims what it hands to MQTT under the store's lock (``outbox_peek(claim=True)``), so a
commit from another thread never merges into a delta that is already on its way.

Optimistic check: a commit may name the version its invocation read (``base_version``) and
the keys it read or wrote; if any changed since, :class:`~agent.errors.StateConflict` is
raised and nothing is written (:mod:`agent.contract.statecheck`).

Must never: publish, or let a sqlite3 object or exception escape.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.contract.statecheck import ChangeVersions, conflict_message
from agent.errors import StateConflict, StoreError
from agent.models import canonical_json
from agent.store.db import Database, set_meta_in
from agent.store.dedupe import Dedupe, ReplyRecord
from agent.store.outbox import Outbox

DELTA_KIND = "sync_delta"
#: What a snapshot message adds around the document (ids, version, checksum, ts).
SNAPSHOT_OVERHEAD = 400


class StateTooLarge(StoreError):
    """A change would make the synced state (or its delta) too big to publish."""


#: (from_version, to_version, changes, checksum) -> the delta message's bytes.
EncodeDelta = Callable[[int, int, dict[str, Any], str], bytes]


@dataclass(frozen=True)
class SyncJob:
    """A write set already applied in memory, for :meth:`SyncState.persist`."""

    #: The effective changes (None deletes); empty when only the reply is to be written.
    changes: dict[str, Any]
    reply: ReplyRecord | None
    #: The version these changes make (the stored one plus one); ignored when no changes.
    to_version: int
    #: Of the whole document after them.
    checksum: str


@dataclass(frozen=True)
class SyncCommit:
    """What a commit did: ``changes`` are the effective ones (no-op writes dropped)."""

    from_version: int
    to_version: int
    changes: dict[str, Any]
    checksum: str
    #: Outbox id of the delta that carries it (a new one, or the one it was merged into).
    delta_id: int
    coalesced: bool


def effective_changes(state: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """The part of ``changes`` that changes ``state`` (compared as canonical JSON)."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if value is None:
            if key in state:
                out[key] = None
        elif key not in state or canonical_json(state[key]) != canonical_json(value):
            out[key] = value
    return out


class SyncState:
    """The synced reported and desired state of a store (see the module docstring)."""

    def __init__(self, db: Database, outbox: Outbox, dedupe: Dedupe) -> None:
        self._db = db
        self._outbox = outbox
        self._dedupe = dedupe
        self._cache: tuple[int, dict[str, Any]] | None = None
        self._changes = ChangeVersions()

    def forget(self) -> None:
        """Drop the cached document (the store is closing; the lock is held)."""
        self._cache = None

    # -- reported state ------------------------------------------------------------------

    def state(self) -> tuple[int, dict[str, Any]]:
        """(version, a copy of the document)."""
        with self._db.lock:
            version, data = self._loaded_locked()
            return version, copy.deepcopy(data)

    def view(self) -> tuple[int, dict[str, Any]]:
        """(version, the document) without a copy: the caller must not mutate it.

        Commits replace the cached document instead of changing it, so what this returns
        stays as it was: it is the cheap snapshot invocations start from.
        """
        with self._db.lock:
            return self._loaded_locked()

    def _loaded_locked(self) -> tuple[int, dict[str, Any]]:
        """The cached (version, document); the caller holds the database's lock."""
        cache = self._cache
        if cache is None:
            conn = self._db.connection()
            try:
                rows = conn.execute("SELECT key, value FROM sync_state").fetchall()
                meta = conn.execute("SELECT value FROM meta WHERE key = 'sync.version'").fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"reading the synced state failed: {exc}") from exc
            version = int(meta[0]) if meta else 0
            cache = (version, {key: json.loads(value) for key, value in rows})
            self._cache = cache
            # Snapshots are handed out from this cache: none is older than this version.
            self._changes = ChangeVersions(floor=version)
        return cache

    def commit(
        self,
        changes: dict[str, Any],
        *,
        delta_topic: str,
        encode_delta: EncodeDelta,
        coalesce_after_id: int,
        reply: ReplyRecord | None = None,
        max_payload: int | None = None,
        base_version: int | None = None,
        checked: list[str] | None = None,
        read_all: bool = False,
    ) -> SyncCommit | None:
        """Apply ``changes`` (None deletes) as the next version and queue its delta, with
        ``reply`` if given, atomically. None when nothing changed (the reply is still queued).

        With ``base_version`` (the version the invocation read), StateConflict is raised
        (nothing written) when a key in ``checked`` (default: the changed keys), or with
        ``read_all`` any key, changed after that version.

        Raises OutboxFull (nothing written) when the outbox cannot take the messages, and
        StateTooLarge (nothing written) when the document, or the delta carrying the change,
        would not fit in ``max_payload`` bytes: every delta and snapshot must be publishable.
        Read, apply and write happen under one lock: concurrent commits never lose keys.
        """
        commit: SyncCommit | None = None
        with self._db.lock:
            version, state = self._loaded_locked()
            if base_version is not None:
                keys = list(changes) if checked is None else checked
                conflicts = self._changes.conflicts(base_version, keys, read_all)
                if conflicts:
                    raise StateConflict(conflict_message(conflicts, base_version), keys=conflicts)
            effective = effective_changes(state, changes)
            new_state = {k: v for k, v in state.items() if k not in effective}
            new_state.update({k: v for k, v in effective.items() if v is not None})
            document = canonical_json(new_state) if effective else b""
            if effective and max_payload is not None:
                size = len(document) + SNAPSHOT_OVERHEAD
                if size > max_payload:
                    raise StateTooLarge(
                        f"the synced state would be {size} bytes as a snapshot, over "
                        f"agent.max_payload_bytes ({max_payload}); the change was not applied"
                    )
            with self._db.transaction("sync_commit") as conn:
                depth = self._outbox.depth
                if effective:
                    _write_changes(conn, effective)
                    _set_version(conn, version + 1)
                    commit, depth = self._queue_delta(
                        conn,
                        version,
                        effective,
                        hashlib.sha256(document).hexdigest(),  # = state_checksum(new_state)
                        (
                            delta_topic,
                            encode_delta,
                            max(coalesce_after_id, self._outbox.claimed_id),
                            max_payload,
                        ),
                        depth,
                    )
                if reply is not None:
                    _, depth = self._dedupe.remember_reply(conn, reply, depth)
            self._outbox.depth = depth
            if commit is not None:
                self._cache = (commit.to_version, new_state)
                self._changes.record(commit.to_version, effective, len(new_state))
        return commit

    def persist(
        self,
        jobs: list[SyncJob],
        *,
        delta_topic: str,
        encode_delta: EncodeDelta,
        coalesce_after_id: int,
        max_payload: int | None = None,
    ) -> int:
        """Write jobs already applied in memory, in order, in ONE transaction (group commit):
        each changed document version, its delta (merged into the newest unsent one, as in
        :meth:`commit`) and each reply with its dedupe row. Returns the version written.

        Nothing is refused for room or size (the caller checked size and admitted the
        invocations while there was room, and others may already have read their writes).
        Raises StoreError (nothing written) when the database fails, or when a job's
        version does not follow the stored one (memory and disk have diverged).
        """
        with self._db.lock:
            version, state = self._loaded_locked()
            changed: list[tuple[int, dict[str, Any], int]] = []
            with self._db.transaction("sync_persist") as conn:
                depth = self._outbox.depth
                for job in jobs:
                    if job.changes:
                        if job.to_version != version + 1:
                            raise StoreError(
                                f"state commit for version {job.to_version} does not follow "
                                f"the stored version {version}"
                            )
                        state = {k: v for k, v in state.items() if k not in job.changes}
                        state.update({k: v for k, v in job.changes.items() if v is not None})
                        _write_changes(conn, job.changes)
                        _, depth = self._queue_delta(
                            conn,
                            version,
                            job.changes,
                            job.checksum,
                            (
                                delta_topic,
                                encode_delta,
                                max(coalesce_after_id, self._outbox.claimed_id),
                                max_payload,
                            ),
                            depth,
                            strict=False,
                        )
                        version += 1
                        changed.append((version, job.changes, len(state)))
                    if job.reply is not None:
                        _, depth = self._dedupe.remember_reply(conn, job.reply, depth, force=True)
                if changed:
                    _set_version(conn, version)
            self._outbox.depth = depth
            self._cache = (version, state)
            for at, keys, size in changed:
                self._changes.record(at, keys, size)
        return version

    def _queue_delta(
        self,
        conn: sqlite3.Connection,
        version: int,
        effective: dict[str, Any],
        checksum: str,
        how: tuple[str, EncodeDelta, int, int | None],
        depth: tuple[int, int],
        *,
        strict: bool = True,
    ) -> tuple[SyncCommit, tuple[int, int]]:
        """Merge into the newest delta not yet handed to MQTT (or held back by the pump:
        ``outbox_hold``), or queue a new one.

        No merge across a snapshot queued after that delta (a mirror waiting for the
        snapshot drops deltas it holds, so the change must come after it), nor when the
        merged delta would outgrow ``max_payload`` or the outbox's byte bound.
        """
        topic, encode_delta, coalesce_after_id, max_payload = how
        row = conn.execute(
            "SELECT id, payload FROM outbox WHERE kind = ? ORDER BY id DESC LIMIT 1",
            (DELTA_KIND,),
        ).fetchone()
        if row is not None and (row[0] > coalesce_after_id or row[0] == self._outbox.held_id):
            delta_id, old_payload = int(row[0]), bytes(row[1])
            snapshot_after = conn.execute(
                "SELECT 1 FROM outbox WHERE kind = 'sync_snapshot' AND id > ? LIMIT 1",
                (delta_id,),
            ).fetchone()
            old = json.loads(old_payload)
            merged = {**old["changes"], **effective}
            payload = encode_delta(int(old["from_version"]), version + 1, merged, checksum)
            count, nbytes = depth
            grown = nbytes - len(old_payload) + len(payload)
            fits = max_payload is None or len(payload) <= max_payload
            if snapshot_after is None and fits and grown <= self._outbox.max_bytes:
                conn.execute("UPDATE outbox SET payload = ? WHERE id = ?", (payload, delta_id))
                commit = SyncCommit(version, version + 1, effective, checksum, delta_id, True)
                return commit, (count, grown)
        payload = encode_delta(version, version + 1, effective, checksum)
        if strict and max_payload is not None and len(payload) > max_payload:
            raise StateTooLarge(
                f"the delta for this change is {len(payload)} bytes, over "
                f"agent.max_payload_bytes ({max_payload}); the change was not applied"
            )
        delta_id, depth = self._outbox.enqueue(
            conn,
            topic,
            payload,
            1,
            False,
            DELTA_KIND,
            None,
            time.time(),
            None,
            base=depth,
            force=not strict,
        )
        return SyncCommit(version, version + 1, effective, checksum, delta_id, False), depth

    def raise_version(self, version: int) -> None:
        """Move the version up to ``version`` (after a restore from an older backup)."""
        with self._db.lock:
            current, state = self._loaded_locked()
            if version <= current:
                return
            with self._db.transaction("sync_raise_version") as conn:
                _set_version(conn, version)
            self._cache = (version, state)

    # -- desired state (cloud-owned) ---------------------------------------------------------

    def desired(self) -> tuple[int, dict[str, Any]]:
        """(version, data) of the desired state applied last; (0, {}) before any."""
        rows = self._db.read(
            "desired_state",
            "SELECT key, value FROM meta WHERE key IN ('desired.version', 'desired.data')",
        )
        values = dict(rows)
        return int(values.get("desired.version", 0)), json.loads(values.get("desired.data", "{}"))

    def set_desired(self, version: int, data: dict[str, Any]) -> None:
        """Store the desired state ``version`` (its ``data``) as the one applied last."""
        with self._db.lock, self._db.transaction("set_desired_state") as conn:
            for key, value in (
                ("desired.version", str(version)),
                ("desired.data", canonical_json(data).decode()),
            ):
                set_meta_in(conn, key, value)


def _write_changes(conn: sqlite3.Connection, changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if value is None:
            conn.execute("DELETE FROM sync_state WHERE key = ?", (key,))
        else:
            conn.execute(
                "INSERT INTO sync_state (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, canonical_json(value).decode()),
            )


def _set_version(conn: sqlite3.Connection, version: int) -> None:
    set_meta_in(conn, "sync.version", str(version))
