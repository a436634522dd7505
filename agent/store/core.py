"""The agent's durable state: one SQLite database, ``<state_dir>/state.db``, in WAL mode.

Owns :class:`Store`, the one object the rest of edge-agent holds: it composes the parts of
the package and keeps the public method names callers use. Each part owns its tables and
says what it must never do:

- :mod:`agent.store.db`: the connection, lock and transactions, schema and migrations,
  open/repair/close, the health probe, meta values, and the mapping of ``sqlite3.Error``
  to :class:`~agent.errors.StoreError` (with the database path in the message).
- :mod:`agent.store.outbox`: every message the agent owes the cloud (its policy: order,
  supersede by key, bounds, removal), and the dead letters.
- :mod:`agent.store.deployments`: the deployed set and the spec each scope asked for.
- :mod:`agent.store.dedupe`: the request-dedupe window, and replies queued with it; its
  in-memory filter of the request ids it may hold is :mod:`agent.store.seen`.
- :mod:`agent.store.state`: the synced reported and desired state.
- :mod:`agent.store.accepted`: invocations accepted and not yet answered.

Must never: publish, spawn, sleep, or let a sqlite3 object or exception escape. It never
drops an outbox message on its own. Here only delegation: no SQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from agent.errors import OutboxFull
from agent.store.db import MIGRATIONS, Database
from agent.store.dedupe import Dedupe, DedupeEntry, QueuedReply, ReplyRecord, Statement
from agent.store.deployments import SPEC_SCOPES, DeploymentRow, Deployments
from agent.store.outbox import DeadLetter, Outbox, OutboxItem
from agent.store.state import EncodeDelta, SyncCommit, SyncJob, SyncState

__all__ = [
    "MIGRATIONS",
    "SPEC_SCOPES",
    "DeadLetter",
    "DedupeEntry",
    "DeploymentRow",
    "OutboxFull",
    "OutboxItem",
    "Store",
]


class Store:
    """The agent's SQLite state. Build it, then :meth:`open` it (or use ``with``).

    Thread-safe: every part runs under the database's one lock (see :mod:`agent.store.db`).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        durability: str = "normal",
        max_messages: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        dedupe_filter: bool = True,
    ) -> None:
        """``dedupe_filter``: keep the in-memory filter of remembered request ids (loaded at
        open), so a new request id costs no query; False for a reader that never asks."""
        #: The connection and its lock, for the package's other tables (accepted.py).
        self.db = Database(path, durability=durability)
        self._outbox = Outbox(self.db, max_messages=max_messages, max_bytes=max_bytes)
        self._deployments = Deployments(self.db)
        self._dedupe = Dedupe(self.db, self._outbox, use_filter=dedupe_filter)
        self._state = SyncState(self.db, self._outbox, self._dedupe)

    @property
    def path(self) -> Path:
        """Where the database lives."""
        return self.db.path

    # -- lifecycle (agent.store.db) ---------------------------------------------------------

    @property
    def repaired(self) -> dict[str, Any] | None:
        """What :meth:`open` with ``repair=True`` found and did to a damaged database, or None."""
        return self.db.repaired

    @property
    def repaired_now(self) -> bool:
        """True when that repair happened in this :meth:`open` (not at an earlier start)."""
        return self.db.repaired_now

    def open(self, *, repair: bool = False) -> None:
        """Create the directory (0700) and the database (0600) if needed, then migrate.

        ``repair`` (the daemon at start; never a reader such as ``edge-agent status``): check
        the file first and replace a damaged one (:func:`agent.store.db.check_and_repair`);
        what was done is in :attr:`repaired` and kept in meta ``store_repaired`` (JSON).
        """
        self.db.open(repair=repair, loaded=self._loaded)

    def probe(self, min_free_bytes: int = 1024 * 1024) -> str | None:
        """Whether the store takes writes again after a fault: None if a small write
        commits and its filesystem has ``min_free_bytes`` free; else why not."""
        return self.db.probe(min_free_bytes)

    def close(self) -> None:
        """Close the connection (SQLite checkpoints the WAL); closing twice is harmless."""
        self.db.close(closed=self._closed)

    def _loaded(self, conn: sqlite3.Connection) -> None:
        # At open, the lock held: what the parts keep in memory, from the tables.
        self._outbox.load_depth(conn)
        self._dedupe.load(conn)

    def _closed(self) -> None:
        # At close, the lock held: forget what the parts keep in memory.
        self._state.forget()
        self._dedupe.forget()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- meta (agent.store.db) --------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or None."""
        return self.db.get_meta(key)

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""
        self.db.set_meta(key, value)

    def meta_items(self, prefix: str) -> dict[str, str]:
        """Every meta key starting with ``prefix`` (a plain prefix, no wildcards) and its value."""
        return self.db.meta_items(prefix)

    # -- spec sources and deployments (agent.store.deployments) -----------------------------

    def put_spec_source(self, scope: str, function_id: str, spec_json: str | None) -> None:
        """Remember the spec ``scope`` ("fleet" or "node") asked for; None = it removed it."""
        self._deployments.put_spec_source(scope, function_id, spec_json)

    def get_spec_sources(self) -> dict[str, dict[str, str]]:
        """Every remembered spec: function id -> {scope: spec_json}."""
        return self._deployments.get_spec_sources()

    def put_deployment(self, row: DeploymentRow) -> None:
        """Insert or replace the deployment of ``row.function_id``."""
        self._deployments.put(row)

    def get_deployment(self, function_id: str) -> DeploymentRow | None:
        """The deployment of ``function_id``, or None."""
        return self._deployments.get(function_id)

    def list_deployments(self) -> list[DeploymentRow]:
        """Every deployment, by function id."""
        return self._deployments.list_all()

    def delete_deployment(self, function_id: str) -> bool:
        """Forget the deployment of ``function_id``; False if there was none."""
        return self._deployments.delete(function_id)

    # -- outbox and dead letters (agent.store.outbox: the policy is there) ------------------

    def set_limits(self, *, max_messages: int | None = None, max_bytes: int | None = None) -> None:
        """Change the outbox bounds (at reload); queued items are kept even if now over."""
        self._outbox.set_limits(max_messages=max_messages, max_bytes=max_bytes)

    def outbox_put(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        kind: str,
        key: str | None = None,
        ts: float | None = None,
        correlation: bytes | None = None,
    ) -> int:
        """Queue a message before publishing it; its id. Raises OutboxFull (backpressure,
        not a StoreError) when it does not fit: see the policy in :mod:`agent.store.outbox`."""
        return self._outbox.put(
            topic, payload, qos=qos, retain=retain, kind=kind, key=key, ts=ts,
            correlation=correlation,
        )  # fmt: skip

    def record_reply(
        self,
        request_id: str,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        ts: float,
        correlation: bytes | None = None,
    ) -> int:
        """Queue a reply and remember its request, atomically; the outbox id.

        If the outbox is full, OutboxFull is raised and the request is not remembered either.
        """
        return self._dedupe.record_reply(
            request_id, topic, payload, qos=qos, ts=ts, correlation=correlation
        )

    def record_replies(
        self, replies: Sequence[QueuedReply], *, ts: float, also: Sequence[Statement] = ()
    ) -> list[int | None]:
        """Group commit: queue many replies ``(request_id or None, topic, payload,
        correlation)`` in ONE transaction, each with a request id remembered for dedupe;
        per reply its outbox id, or None when the outbox had no room for it (that reply
        alone is not written). ``also``: statements run in the same transaction. Any other
        failure: StoreError, nothing written. See :meth:`agent.store.dedupe.Dedupe.record_replies`.
        """
        return self._dedupe.record_replies(replies, ts=ts, also=also)

    def outbox_peek(
        self, limit: int, after_id: int = 0, *, claim: bool = False
    ) -> list[OutboxItem]:
        """Up to ``limit`` queued items with ids above ``after_id``, in delivery order.

        ``claim``: the caller hands them to MQTT now; a state commit (from any thread)
        will not merge a change into one of them afterwards.
        """
        return self._outbox.peek(limit, after_id, claim=claim)

    def outbox_ack(self, item_id: int) -> bool:
        """The broker took item ``item_id``: delete it. False if it was not queued."""
        return self._outbox.ack(item_id)

    def outbox_ack_many(self, item_ids: Sequence[int]) -> int:
        """The broker took all of these: delete them in ONE transaction; how many were
        still queued. StoreError: nothing deleted."""
        return self._outbox.ack_many(item_ids)

    def outbox_ack_later(self, item_ids: Sequence[int]) -> None:
        """The broker took all of these: delete them with the next group commit of replies
        (:meth:`record_replies`) or :meth:`outbox_flush_acked`, whichever comes first. A
        crash before that sends them again after the restart (at least once)."""
        self._outbox.ack_later(item_ids)

    def outbox_flush_acked(self) -> int:
        """Delete what :meth:`outbox_ack_later` noted, in one transaction; how many were
        still queued. StoreError: nothing deleted, still noted."""
        return self._outbox.flush_acked()

    def outbox_acks_noted(self) -> int:
        """How many acknowledged items :meth:`outbox_ack_later` noted and nothing deleted yet."""
        return len(self._outbox.acked)

    def outbox_hold(self, item_id: int) -> None:
        """The pump claimed delta ``item_id`` but holds it back for a while: state commits
        may merge into it again until :meth:`outbox_release` (one held item at a time)."""
        self._outbox.hold(item_id)

    def outbox_release(self) -> OutboxItem | None:
        """End the hold: the held item as it is now (after every merge), which no commit
        will touch again; None when nothing is held or it is gone (superseded, dead)."""
        return self._outbox.release(self._outbox_get_locked)

    def outbox_get(self, item_id: int) -> OutboxItem | None:
        """Item ``item_id`` if it is still queued (not acknowledged, superseded or dead)."""
        return self._outbox.get(item_id)

    def _outbox_get_locked(self, item_id: int) -> OutboxItem | None:
        # The read outbox_release makes under the lock; tests fail it once
        # (tests/test_sync_mirror.py): the held delta then stays held.
        return self._outbox.get_locked(item_id)

    def outbox_dead_letter(
        self, item_id: int, *, reason_code: int, reason: str, attempts: int, ts: float
    ) -> bool:
        """Move item ``item_id`` from the outbox into ``dead_letter``, atomically.

        False if it was no longer queued (superseded meanwhile). Keeps at most
        :data:`~agent.store.outbox.MAX_DEAD_LETTERS`, dropping the oldest.
        """
        return self._outbox.dead_letter(
            item_id, reason_code=reason_code, reason=reason, attempts=attempts, ts=ts
        )

    def dead_letter_counts(self) -> tuple[int, int]:
        """(dead letters, of which marked for retry); another process may change both."""
        return self._outbox.dead_letter_counts()

    def dead_letters(self, limit: int = 10) -> list[DeadLetter]:
        """The newest ``limit`` dead letters, newest first."""
        return self._outbox.dead_letters(limit)

    def dead_letters_clear(self) -> int:
        """Forget every dead letter (the operator's call); how many were forgotten."""
        return self._outbox.dead_letters_clear()

    def dead_letters_request_retry(self) -> int:
        """Mark every dead letter to be sent again by the agent; how many were marked."""
        return self._outbox.dead_letters_request_retry()

    def dead_letters_requeue(self) -> int:
        """The agent's half of a retry: marked dead letters go back to the end of the outbox.

        Within the outbox bounds: what does not fit stays marked for the next call. A keyed
        item (a retained function state) is requeued only if nothing newer of its key is
        queued, and superseded by anything newer later as usual.
        """
        return self._outbox.dead_letters_requeue()

    def outbox_depth(self) -> tuple[int, int]:
        """(messages, payload bytes) queued; O(1), from counters kept with each commit."""
        return self._outbox.depth

    def outbox_has_room(self, n_bytes: int) -> bool:
        """Whether one more message of ``n_bytes`` fits (not counting anything it supersedes)."""
        return self._outbox.has_room(n_bytes)

    # -- request dedupe (agent.store.dedupe) ------------------------------------------------

    def dedupe_get(self, request_id: str) -> DedupeEntry | None:
        """The reply already sent for ``request_id``, or None if it is new (or pruned)."""
        return self._dedupe.get(request_id)

    def dedupe_put(self, request_id: str, reply_topic: str, reply: bytes, ts: float) -> None:
        """Remember the reply to ``request_id``; replaces an earlier entry of the same id."""
        self._dedupe.put(request_id, reply_topic, reply, ts)

    def dedupe_prune(self, older_than_ts: float) -> int:
        """Forget requests recorded before ``older_than_ts``; how many were forgotten."""
        return self._dedupe.prune(older_than_ts)

    # -- synced state (agent.store.state: coalescing and the optimistic check are there) ----

    def sync_state(self) -> tuple[int, dict[str, Any]]:
        """(version, a copy of the document)."""
        return self._state.state()

    def sync_view(self) -> tuple[int, dict[str, Any]]:
        """(version, the document) without a copy: the caller must not mutate it."""
        return self._state.view()

    def sync_commit(
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

        Raises StateConflict, OutboxFull or StateTooLarge with nothing written: see
        :meth:`agent.store.state.SyncState.commit`.
        """
        return self._state.commit(
            changes, delta_topic=delta_topic, encode_delta=encode_delta,
            coalesce_after_id=coalesce_after_id, reply=reply, max_payload=max_payload,
            base_version=base_version, checked=checked, read_all=read_all,
        )  # fmt: skip

    def sync_persist(
        self,
        jobs: list[SyncJob],
        *,
        delta_topic: str,
        encode_delta: EncodeDelta,
        coalesce_after_id: int,
        max_payload: int | None = None,
    ) -> int:
        """Write jobs already applied in memory, in order, in ONE transaction (group commit);
        the version written. Never refused for room or size; StoreError (nothing written)
        when the database fails: see :meth:`agent.store.state.SyncState.persist`."""
        return self._state.persist(
            jobs, delta_topic=delta_topic, encode_delta=encode_delta,
            coalesce_after_id=coalesce_after_id, max_payload=max_payload,
        )  # fmt: skip

    def sync_raise_version(self, version: int) -> None:
        """Move the version up to ``version`` (after a restore from an older backup)."""
        self._state.raise_version(version)

    def desired_state(self) -> tuple[int, dict[str, Any]]:
        """(version, data) of the desired state applied last; (0, {}) before any."""
        return self._state.desired()

    def set_desired_state(self, version: int, data: dict[str, Any]) -> None:
        """Store the desired state ``version`` (its ``data``) as the one applied last."""
        self._state.set_desired(version, data)
