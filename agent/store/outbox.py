"""The outbox: every message the agent owes the cloud, in the order it must be published,
and the dead letters the broker refused for good.

Owns the ``outbox`` and ``dead_letter`` tables, the in-memory depth counters and bounds, and
what the pump has claimed or holds back (which a state commit must not, or may again, merge
into: :mod:`agent.store.state`). Runs its SQL through :class:`~agent.store.db.Database`.

Must never: publish (the pump in :mod:`agent.edge.outbox` does), or drop a message on its
own (see the policy below).

Outbox policy:

1. Order. Ids come from ``AUTOINCREMENT``: strictly increasing for the life of the
   database, never reused even after the outbox empties, so id order is delivery order.
2. Supersede by key. When :meth:`Store.outbox_put` is given a ``key``, every queued item
   with the same key is deleted in the same transaction and the new item gets a new id (it
   goes to the back). For a retained topic only the last value matters. If a superseded
   item was already published and awaits its acknowledgement, its later
   :meth:`Store.outbox_ack` simply returns False.
3. Bounds. ``max_messages`` and ``max_bytes`` (payload bytes; topics and row overhead are
   not counted) bound the queue. When adding an item would exceed either bound, after
   counting what it supersedes, :class:`~agent.errors.OutboxFull` is raised and the
   transaction is rolled back: nothing is ever dropped, not even the item that would have
   been superseded. OutboxFull is backpressure, not a StoreError. The daemon answers new
   invocations with ``overloaded`` until the broker drains the queue. Lowering the limits
   below the current depth keeps what is queued and refuses new items.
4. Removal. An item leaves the outbox only by :meth:`Store.outbox_ack` (the broker took
   it; :meth:`Store.outbox_ack_many` deletes a run of them in one transaction, and
   :meth:`Store.outbox_ack_later` notes them for the next group commit's transaction or
   :meth:`Store.outbox_flush_acked`), by being
   superseded, or by :meth:`Store.outbox_dead_letter` (the broker refused it for good: it
   moves, in one transaction, into the ``dead_letter`` table, with the reason
   and a timestamp, so what queued behind it drains).

The tail: the replies a group commit wrote (:meth:`Outbox.committed_tail`) are kept in
memory until claimed, so the pump's next :meth:`Outbox.peek` hands them out without reading
them back, as long as no other insert came after them (any other insert, a delete of one of
them, a reopen or a rolled-back insert only makes the peek read the table, as before).

Dead letters: kept until the operator clears them (:meth:`Store.dead_letters_clear`) or asks
for them to be sent again (:meth:`Store.dead_letters_request_retry` marks them; the agent's
:meth:`Store.dead_letters_requeue` puts them back at the end of the outbox: only the agent
writes the outbox, whose depth it counts in memory). Both work from another process while
the agent runs (WAL). At most ``MAX_DEAD_LETTERS`` are kept; beyond that the oldest go.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import OutboxFull, StoreError
from agent.store.db import Database

__all__ = ["MAX_DEAD_LETTERS", "DeadLetter", "Outbox", "OutboxItem"]

#: Dead letters kept at most; a flood of refusals must not fill the gateway's disk.
MAX_DEAD_LETTERS = 1000

_OUTBOX_INSERT = (
    "INSERT INTO outbox (topic, payload, qos, retain, kind, key, created_ts, correlation)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
#: Ids bound per statement by :meth:`Outbox.ack_many` (old SQLite builds allow 999 variables).
_IDS_PER_STATEMENT = 500
_OUTBOX_COLUMNS = "id, topic, payload, qos, retain, kind, key, created_ts, correlation"
#: ``DELETE ... RETURNING`` (SQLite 3.35+; Debian 12 has 3.40): one statement per PUBACK run.
_RETURNING = sqlite3.sqlite_version_info >= (3, 35)
#: Committed replies :meth:`Outbox.peek` keeps to hand out without a read (offline they pile
#: up; past this many it reads them back, as before).
_TAIL_MAX = 512
_TAIL_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class OutboxItem:
    """One message the agent owes the cloud, in the order it must be published."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str
    key: str | None
    created_ts: float
    correlation: bytes | None = None


@dataclass(frozen=True)
class DeadLetter:
    """An outbox item the broker refused for good, and why."""

    id: int
    topic: str
    kind: str
    reason_code: int
    reason: str
    attempts: int
    dead_ts: float
    created_ts: float
    size: int


class Outbox:
    """The outbox and dead-letter tables of a :class:`~agent.store.db.Database`."""

    def __init__(self, db: Database, *, max_messages: int, max_bytes: int) -> None:
        self._db = db
        self.max_messages, self.max_bytes = checked_limits(max_messages, max_bytes)
        #: (count, payload bytes) queued; one tuple so readers never see a torn pair. Whoever
        #: commits a transaction that queued or removed items sets it (under the lock).
        self.depth: tuple[int, int] = (0, 0)
        #: The highest outbox id handed to MQTT (``peek(claim=True)``): never rewritten.
        self.claimed_id = 0
        #: A delta the pump claimed and holds back (:meth:`hold`): still merged into. 0: none.
        self.held_id = 0
        #: Items the broker took whose rows are not deleted yet (:meth:`ack_later`): the next
        #: group commit deletes them in its own transaction (:meth:`delete_acked`), or
        #: :meth:`flush_acked` does. Under the lock.
        self.acked: list[int] = []
        #: Replies the group commits queued (committed, consecutive ids, not yet claimed):
        #: :meth:`peek` serves them without reading them back (see :meth:`_tail_after`).
        self._tail: list[OutboxItem] = []
        #: The id of the last item put in the tail (kept when the tail is claimed empty).
        self._tail_end = 0
        self._tail_bytes = 0  # the payload bytes it holds
        #: The highest id an INSERT of this process produced, committed or rolled back.
        self._last_insert = 0

    def load_depth(self, conn: sqlite3.Connection) -> None:
        """Count what is queued (at open, the lock held)."""
        count, nbytes = conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox"
        ).fetchone()
        self.depth = (int(count), int(nbytes))
        self._tail = []  # a reopened (maybe repaired) file: read it again
        self._tail_bytes = self._tail_end = self._last_insert = 0
        # Noted ids name rows of the file as it was (a repaired one starts its ids again):
        # what they stand for is sent again, at least once, never another row deleted.
        self.acked = []

    def set_limits(self, *, max_messages: int | None = None, max_bytes: int | None = None) -> None:
        """Change the outbox bounds (at reload); queued items are kept even if now over."""
        with self._db.lock:
            self.max_messages, self.max_bytes = checked_limits(
                self.max_messages if max_messages is None else max_messages,
                self.max_bytes if max_bytes is None else max_bytes,
            )

    def put(
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
        """Queue a message before publishing it; its id. Raises OutboxFull (see policy)."""
        check_qos(qos)
        created_ts = time.time() if ts is None else ts
        with self._db.lock:
            with self._db.transaction("outbox_put") as conn:
                item_id, depth = self.enqueue(
                    conn, topic, payload, qos, retain, kind, key, created_ts, correlation
                )
            self.depth = depth
        return item_id

    def enqueue(
        self,
        conn: sqlite3.Connection,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        kind: str,
        key: str | None,
        created_ts: float,
        correlation: bytes | None = None,
        *,
        base: tuple[int, int] | None = None,
        force: bool = False,
    ) -> tuple[int, tuple[int, int]]:
        """Insert inside the caller's transaction; the id and the depth once committed.

        ``base`` is the depth to start from when the transaction already queued others.
        ``force``: past the bounds too (state commits whose invocations were admitted while
        there was room, and are already visible to others: they must not be refused now).
        At the bound (what it supersedes not counted), the rows the broker took and that
        only linger (:meth:`ack_later`) are deleted in this transaction first; they stay
        noted (deleting them again finds nothing), so a rollback leaves them noted.
        """
        count, nbytes = self.depth if base is None else base
        if self.acked and not force and not self._fits(len(payload), (count, nbytes)):
            count, nbytes = self._delete(conn, self.acked, (count, nbytes))
        gone_count = gone_bytes = 0
        if key is not None:
            gone_count, gone_bytes = conn.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox WHERE key = ?",
                (key,),
            ).fetchone()
        new_count = count - gone_count + 1
        new_bytes = nbytes - gone_bytes + len(payload)
        if not force:
            self._check_room((count, nbytes), (new_count, new_bytes), len(payload), kind, topic)
        if gone_count:
            conn.execute("DELETE FROM outbox WHERE key = ?", (key,))
        cursor = conn.execute(
            _OUTBOX_INSERT, (topic, payload, qos, int(retain), kind, key, created_ts, correlation)
        )
        assert cursor.lastrowid is not None  # an INSERT into a rowid table always sets it
        self._last_insert = max(self._last_insert, cursor.lastrowid)
        return cursor.lastrowid, (new_count, new_bytes)

    def _check_room(
        self, depth: tuple[int, int], new: tuple[int, int], size: int, kind: str, topic: str
    ) -> None:
        """OutboxFull unless the depth ``new`` is within the bounds (``depth``: before)."""
        if new[0] > self.max_messages or new[1] > self.max_bytes:
            raise OutboxFull(
                f"outbox of {self._db.path} is full: {depth[0]} messages, {depth[1]} bytes "
                f"queued (limits {self.max_messages} messages, {self.max_bytes} bytes);"
                f" refused a {size}-byte {kind} message for {topic}",
                depth=depth,
            )

    def enqueue_many(
        self,
        conn: sqlite3.Connection,
        messages: Sequence[tuple[str, bytes, bytes | None]],
        kind: str,
        created_ts: float,
        *,
        base: tuple[int, int] | None = None,
    ) -> tuple[list[int | None], tuple[int, int]]:
        """Insert QoS 1 messages without a key, ``(topic, payload, correlation)`` each,
        inside the caller's transaction with one statement (group commit: one call into
        SQLite for the lot, not one per message); each one's id, or None for one the bounds
        refused (the others are still queued), and the depth once committed."""
        depth = self.depth if base is None else base
        rows: list[tuple[Any, ...]] = []
        slots: list[int | None] = []
        for topic, payload, correlation in messages:
            new = (depth[0] + 1, depth[1] + len(payload))
            try:
                self._check_room(depth, new, len(payload), kind, topic)
            except OutboxFull:
                slots.append(None)
                continue
            depth = new
            slots.append(len(rows))
            rows.append((topic, payload, 1, 0, kind, None, created_ts, correlation))
        if not rows:
            return slots, depth
        conn.executemany(_OUTBOX_INSERT, rows)
        # AUTOINCREMENT ids, one writer inside one transaction: consecutive, the last known.
        (last,) = conn.execute("SELECT last_insert_rowid()").fetchone()
        self._last_insert = max(self._last_insert, int(last))
        first = int(last) - len(rows) + 1
        return [None if slot is None else first + slot for slot in slots], depth

    def committed_tail(self, items: Sequence[OutboxItem]) -> None:
        """The caller committed ``items`` (a group commit's replies, ids consecutive, the
        lock held): the next :meth:`peek` may hand them out without reading them back."""
        if not items:
            return
        size = sum(len(item.payload) for item in items)
        if (
            self._tail_end + 1 != items[0].id
            or len(self._tail) + len(items) > _TAIL_MAX
            or self._tail_bytes + size > _TAIL_MAX_BYTES
        ):
            self._tail.clear()  # not contiguous with what is kept (or too much offline)
            self._tail_bytes = 0
        self._tail.extend(items)
        self._tail_bytes += size
        self._tail_end = items[-1].id

    def _tail_after(self, after_id: int) -> int | None:
        """Where ids above ``after_id`` start in the tail, when the tail holds every row
        with such an id; None when only the table can say.

        It does when the tail reaches back to ``after_id + 1`` (what was claimed is trimmed
        off) and its end is the last id any INSERT produced: the ids in between are
        consecutive and committed, none of them is gone (a delete of one drops the tail),
        and no row above exists. A rolled-back INSERT only makes this fail: a read.
        """
        end = self._tail_end
        if end == 0 or end != self._last_insert or after_id > end:
            return None
        start = after_id + 1 - (self._tail[0].id if self._tail else end + 1)
        return None if start < 0 else start

    def _drop_tail(self, deleted: Sequence[int]) -> None:
        """Rows ``deleted`` are being deleted: a tail holding one of them is dropped."""
        if deleted and self._tail and max(deleted) >= self._tail[0].id:
            self._tail.clear()
            self._tail_bytes = self._tail_end = 0

    def peek(self, limit: int, after_id: int = 0, *, claim: bool = False) -> list[OutboxItem]:
        """Up to ``limit`` queued items with ids above ``after_id``, in delivery order.

        ``claim``: the caller hands them to MQTT now; a state commit (from any thread)
        will not merge a change into one of them afterwards.
        """
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._db.lock:
            start = self._tail_after(after_id)
            if start is not None:  # just committed by a group commit: no need to read back
                items = self._tail[start : start + limit]
            else:
                rows = self._db.read_locked(
                    "outbox_peek",
                    f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, limit),
                )
                items = [_item(row) for row in rows]
            if claim and items:
                self.claimed_id = max(self.claimed_id, items[-1].id)
                tail = self._tail
                if tail and tail[0].id <= self.claimed_id:  # what is claimed is not kept
                    gone = min(len(tail), self.claimed_id - tail[0].id + 1)
                    self._tail_bytes -= sum(len(item.payload) for item in tail[:gone])
                    del tail[:gone]
        return items

    def ack(self, item_id: int) -> bool:
        """The broker took item ``item_id``: delete it. False if it was not queued."""
        return self.ack_many((item_id,), what="outbox_ack") == 1

    def ack_many(self, item_ids: Sequence[int], *, what: str = "outbox_ack_many") -> int:
        """The broker took all of these: delete them in ONE transaction; how many were
        still queued (a superseded one is simply not found, as in :meth:`ack`). StoreError:
        nothing deleted."""
        if not item_ids:
            return 0
        with self._db.lock:
            return self._ack_locked(item_ids, what)

    def _ack_locked(self, item_ids: Sequence[int], what: str) -> int:
        """:meth:`ack_many` with the lock held."""
        with self._db.transaction(what) as conn:
            depth = self._delete(conn, item_ids, self.depth)
        found = self.depth[0] - depth[0]
        self.depth = depth
        return found

    def ack_later(self, item_ids: Sequence[int]) -> None:
        """The broker took all of these: delete them with the next group commit (or
        :meth:`flush_acked`). Until then they stay in the table and in the depth: after a
        crash meanwhile they are sent again (at least once), never lost."""
        if item_ids:
            with self._db.lock:
                self.acked.extend(item_ids)

    def delete_acked(self, conn: sqlite3.Connection, base: tuple[int, int]) -> tuple[int, int]:
        """Inside the caller's transaction (the lock held): delete what :meth:`ack_later`
        noted; the depth from ``base`` once committed. The caller calls
        :meth:`acked_deleted` with how many it took once the transaction committed."""
        return self._delete(conn, self.acked, base) if self.acked else base

    def acked_deleted(self, taken: int) -> None:
        """The transaction that deleted the first ``taken`` noted acks committed (the lock held)."""
        del self.acked[:taken]

    def flush_acked(self) -> int:
        """Delete what :meth:`ack_later` noted, in one transaction of its own; how many rows
        were still queued. StoreError: nothing deleted, still noted."""
        with self._db.lock:
            if not self.acked:
                return 0
            found = self._ack_locked(self.acked, "outbox_ack_many")
            self.acked = []
        return found

    def _delete(
        self, conn: sqlite3.Connection, item_ids: Sequence[int], base: tuple[int, int]
    ) -> tuple[int, int]:
        """Delete these ids inside the caller's transaction; the depth from ``base`` after
        (a superseded id is simply not found)."""
        found = found_bytes = 0
        self._drop_tail(item_ids)
        for start in range(0, len(item_ids), _IDS_PER_STATEMENT):
            ids = tuple(item_ids[start : start + _IDS_PER_STATEMENT])
            marks = ",".join("?" * len(ids))
            if _RETURNING:  # one statement: what it deleted, and how big
                sizes = conn.execute(
                    f"DELETE FROM outbox WHERE id IN ({marks}) RETURNING length(payload)",
                    ids,
                ).fetchall()
            else:
                sizes = conn.execute(
                    f"SELECT length(payload) FROM outbox WHERE id IN ({marks})", ids
                ).fetchall()
                conn.execute(f"DELETE FROM outbox WHERE id IN ({marks})", ids)
            found += len(sizes)
            found_bytes += sum(int(size) for (size,) in sizes)
        return base[0] - found, base[1] - found_bytes

    def hold(self, item_id: int) -> None:
        """The pump claimed delta ``item_id`` but holds it back for a while: state commits
        may merge into it again until :meth:`release` (one held item at a time)."""
        with self._db.lock:
            self.held_id = item_id

    def release(self, read_locked: Callable[[int], OutboxItem | None]) -> OutboxItem | None:
        """End the hold: the held item as it is now (after every merge), which no commit
        will touch again; None when nothing is held or it is gone (superseded, dead).

        ``read_locked`` reads it with the lock held: :meth:`get_locked`, through the store
        (a seam tests use to fail that read once: the item then stays held)."""
        with self._db.lock:
            item_id = self.held_id
            item = read_locked(item_id) if item_id else None  # StoreError: still held
            self.held_id = 0
            return item

    def get(self, item_id: int) -> OutboxItem | None:
        """Item ``item_id`` if it is still queued (not acknowledged, superseded or dead)."""
        with self._db.lock:
            return self.get_locked(item_id)

    def get_locked(self, item_id: int) -> OutboxItem | None:
        """:meth:`get` with the lock already held."""
        try:
            row = (
                self._db.connection()
                .execute(f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id = ?", (item_id,))
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise StoreError(f"outbox_get failed on {self._db.path}: {exc}") from exc
        return None if row is None else _item(row)

    def dead_letter(
        self, item_id: int, *, reason_code: int, reason: str, attempts: int, ts: float
    ) -> bool:
        """Move item ``item_id`` from the outbox into ``dead_letter``, atomically.

        False if it was no longer queued (superseded meanwhile). Keeps at most
        :data:`MAX_DEAD_LETTERS`, dropping the oldest.
        """
        with self._db.lock:
            with self._db.transaction("outbox_dead_letter") as conn:
                row = conn.execute(
                    "SELECT length(payload) FROM outbox WHERE id = ?", (item_id,)
                ).fetchone()
                if row is not None:
                    self._drop_tail((item_id,))
                    conn.execute(
                        "INSERT INTO dead_letter (outbox_id, topic, payload, qos, retain, kind,"
                        " key, created_ts, correlation, reason_code, reason, attempts, dead_ts)"
                        " SELECT id, topic, payload, qos, retain, kind, key, created_ts,"
                        " correlation, ?, ?, ?, ? FROM outbox WHERE id = ?",
                        (reason_code, reason, attempts, ts, item_id),
                    )
                    conn.execute("DELETE FROM outbox WHERE id = ?", (item_id,))
                    conn.execute(
                        "DELETE FROM dead_letter WHERE id <= (SELECT max(id) FROM dead_letter) - ?",
                        (MAX_DEAD_LETTERS,),
                    )
            if row is None:
                return False
            count, nbytes = self.depth
            self.depth = (count - 1, nbytes - int(row[0]))
        return True

    def dead_letter_counts(self) -> tuple[int, int]:
        """(dead letters, of which marked for retry); another process may change both."""
        [(count, marked)] = self._db.read(
            "dead_letter_counts",
            "SELECT count(*), coalesce(sum(retry), 0) FROM dead_letter",
        )
        return int(count), int(marked)

    def dead_letters(self, limit: int = 10) -> list[DeadLetter]:
        """The newest ``limit`` dead letters, newest first."""
        rows = self._db.read(
            "dead_letters",
            "SELECT id, topic, kind, reason_code, reason, attempts, dead_ts, created_ts,"
            " length(payload) FROM dead_letter ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [DeadLetter(*row) for row in rows]

    def dead_letters_clear(self) -> int:
        """Forget every dead letter (the operator's call); how many were forgotten."""
        return self._db.write("dead_letters_clear", "DELETE FROM dead_letter", ())

    def dead_letters_request_retry(self) -> int:
        """Mark every dead letter to be sent again by the agent; how many were marked."""
        return self._db.write("dead_letters_request_retry", "UPDATE dead_letter SET retry = 1", ())

    def dead_letters_requeue(self) -> int:
        """The agent's half of a retry: marked dead letters go back to the end of the outbox.

        Within the outbox bounds: what does not fit stays marked for the next call. A keyed
        item (a retained function state) is requeued only if nothing newer of its key is
        queued, and superseded by anything newer later as usual.
        """
        moved = 0
        with self._db.lock:
            with self._db.transaction("dead_letters_requeue") as conn:
                rows = conn.execute(
                    "SELECT id, topic, payload, qos, retain, kind, key, created_ts, correlation"
                    " FROM dead_letter WHERE retry = 1 ORDER BY id"
                ).fetchall()
                depth = self.depth
                for dead_id, topic, payload, qos, retain, kind, key, created_ts, corr in rows:
                    newer = (
                        key is not None
                        and conn.execute("SELECT 1 FROM outbox WHERE key = ?", (key,)).fetchone()
                    )
                    if not newer:
                        try:
                            _, depth = self.enqueue(
                                conn, topic, bytes(payload), qos, bool(retain), kind, key,
                                created_ts, None if corr is None else bytes(corr), base=depth,
                            )  # fmt: skip
                        except OutboxFull:
                            break
                    conn.execute("DELETE FROM dead_letter WHERE id = ?", (dead_id,))
                    moved += 1
            self.depth = depth
        return moved

    def has_room(self, n_bytes: int) -> bool:
        """Whether one more message of ``n_bytes`` fits (not counting anything it supersedes).
        At the bound, what the broker took and only lingers is deleted first (StoreError if
        that fails)."""
        if self._fits(n_bytes):
            return True
        if not self.acked:
            return False
        self.flush_acked()
        return self._fits(n_bytes)

    def _fits(self, n_bytes: int, depth: tuple[int, int] | None = None) -> bool:
        count, nbytes = self.depth if depth is None else depth
        return count + 1 <= self.max_messages and nbytes + n_bytes <= self.max_bytes


def _item(row: Any) -> OutboxItem:
    i, topic, payload, qos, retain, kind, key, created_ts, corr = row
    return OutboxItem(
        i, topic, bytes(payload), qos, bool(retain), kind, key, created_ts,
        None if corr is None else bytes(corr),
    )  # fmt: skip


def checked_limits(max_messages: int, max_bytes: int) -> tuple[int, int]:
    """The outbox bounds, or ValueError when one is below 1."""
    if max_messages < 1:
        raise ValueError(f"max_messages must be >= 1, got {max_messages}")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    return max_messages, max_bytes


def check_qos(qos: int) -> None:
    """ValueError unless ``qos`` is an MQTT QoS (0, 1 or 2)."""
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
