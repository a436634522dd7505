"""The request-dedupe window, and replies queued together with their dedupe row.

Owns the ``dedupe`` table: :meth:`Dedupe.get` returns a :class:`DedupeEntry`
(``reply_topic``, ``reply``, ``ts``) so a duplicate request can be answered on the topic of
the original; :meth:`Dedupe.put` replaces an existing entry of the same request id.
:meth:`Dedupe.record_reply` enqueues a reply and remembers its request in one transaction
(:meth:`Dedupe.remember_reply` does the same inside a transaction the state commit opened);
:meth:`Dedupe.record_replies` queues many replies in one transaction (the loop's group commit
of a run of finished invocations), each refused alone when the outbox has no room for it.

In front of the table, a :class:`~agent.store.seen.SeenFilter` of the request ids it may
hold: :meth:`Dedupe.get` answers an id the filter has certainly never seen without a query
(nearly every request is new). It holds every request id in the table whenever a reader
can look: filled from the table at open (:meth:`Dedupe.load`, before anyone can use the
connection), fed by every write of a row before its transaction commits (an id whose
transaction then rolls back is only a false positive), trimmed by :meth:`Dedupe.prune` only
after its DELETE committed, and disabled (every id goes to SQLite) once the store closes.
A row written behind the store's back (another connection) is not in it: nothing but this
class writes the table.

Must never: queue a reply without its dedupe row in the same transaction, write a dedupe
row without adding its request id to the filter first, or let a sqlite3 object or
exception escape.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.store.db import Database
from agent.store.outbox import Outbox, OutboxItem, check_qos
from agent.store.seen import SeenFilter

__all__ = ["Dedupe", "DedupeEntry", "QueuedReply", "ReplyRecord"]

#: One reply of a group commit: (request id to remember it under, or None; topic; payload;
#: MQTT 5 correlation data).
QueuedReply = tuple[str | None, str, bytes, bytes | None]
#: A statement (sql, params) run in a group commit's transaction (``record_replies(also=)``).
Statement = tuple[str, tuple[Any, ...]]

_DEDUPE_UPSERT = (
    "INSERT INTO dedupe (request_id, reply_topic, reply, ts) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (request_id) DO UPDATE SET"
    " reply_topic = excluded.reply_topic, reply = excluded.reply, ts = excluded.ts"
)


@dataclass(frozen=True)
class DedupeEntry:
    """A request already answered: the reply and the topic it went to."""

    reply_topic: str
    reply: bytes
    ts: float


@dataclass(frozen=True)
class ReplyRecord:
    """A reply to queue (and remember for duplicates) in the same transaction."""

    request_id: str
    topic: str
    payload: bytes
    ts: float
    correlation: bytes | None = None


class Dedupe:
    """The dedupe table of a :class:`~agent.store.db.Database`; replies go to ``outbox``."""

    def __init__(self, db: Database, outbox: Outbox, *, use_filter: bool = True) -> None:
        self._db = db
        self._outbox = outbox
        #: Request ids the table may hold; disabled (every id "maybe") until :meth:`load`.
        self.seen = SeenFilter()
        self.seen.disable()
        #: False: never loaded, every lookup queries (a reader such as ``edge-agent status``
        #: spares the load at open: about 2 us per remembered request).
        self._use_filter = use_filter

    def load(self, conn: sqlite3.Connection) -> None:
        """Fill the filter from the table (at open, the lock held, before anyone else can
        use the connection; a reopen starts again from the table)."""
        if self._use_filter:
            self.seen.replace(conn.execute("SELECT request_id, ts FROM dedupe"))

    def forget(self) -> None:
        """The store is closing (the lock held): every id goes to SQLite again."""
        self.seen.disable()

    def get(self, request_id: str) -> DedupeEntry | None:
        """The reply already sent for ``request_id``, or None if it is new (or pruned)."""
        # Without the lock: see "Concurrency" in agent.store.seen (a committed row's id is
        # in the filter; a write racing this call at worst is not seen, as with SQL).
        if not self.seen.might_contain(request_id):
            return None
        rows = self._db.read(
            "dedupe_get",
            "SELECT reply_topic, reply, ts FROM dedupe WHERE request_id = ?",
            (request_id,),
        )
        if not rows:
            return None
        reply_topic, reply, ts = rows[0]
        return DedupeEntry(reply_topic, bytes(reply), ts)

    def put(self, request_id: str, reply_topic: str, reply: bytes, ts: float) -> None:
        """Remember the reply to ``request_id``; replaces an earlier entry of the same id."""
        with self._db.lock:
            self.seen.add(request_id, ts)
            with self._db.transaction("dedupe_put") as conn:
                conn.execute(_DEDUPE_UPSERT, (request_id, reply_topic, reply, ts))

    def prune(self, older_than_ts: float) -> int:
        """Forget requests recorded before ``older_than_ts``; how many were forgotten."""
        with self._db.lock:
            with self._db.transaction("dedupe_prune") as conn:
                pruned = conn.execute("DELETE FROM dedupe WHERE ts < ?", (older_than_ts,)).rowcount
            # Committed: the rows of the generations it drops are gone (never before).
            self.seen.forget_before(older_than_ts)
        return pruned

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
        check_qos(qos)
        with self._db.lock:
            with self._db.transaction("record_reply") as conn:
                item_id, depth = self._outbox.enqueue(
                    conn, topic, payload, qos, False, "reply", None, ts, correlation
                )
                self.seen.add(request_id, ts)
                conn.execute(_DEDUPE_UPSERT, (request_id, topic, payload, ts))
            self._outbox.depth = depth
        return item_id

    def record_replies(
        self, replies: Sequence[QueuedReply], *, ts: float, also: Sequence[Statement] = ()
    ) -> list[int | None]:
        """Group commit: queue many replies (QoS 1) in ONE transaction (one commit, one WAL
        sync under ``durability = "full"``); each with a request id is also remembered for
        dedupe, as :meth:`record_reply` does.

        Per reply the outcome is its outbox id, or None when the outbox had no room for it
        (nothing of that reply is written, the others still are: the bound is checked
        before its INSERT, so the transaction stays clean). ``also``: statements run in the
        same transaction (the deletes of the accepted invokes these replies answer). Any
        other failure rolls everything back and raises StoreError: nothing is written.
        """
        outbox = self._outbox
        with self._db.lock:
            acked = len(outbox.acked)
            with self._db.transaction("record_replies") as conn:
                base = outbox.delete_acked(conn, outbox.depth)  # the PUBACKs since the last
                out, depth = outbox.enqueue_many(
                    conn, [(topic, payload, corr) for _, topic, payload, corr in replies],
                    "reply", ts, base=base,
                )  # fmt: skip
                remembered = [
                    (request_id, topic, payload, ts)
                    for (request_id, topic, payload, _), item_id in zip(replies, out, strict=True)
                    if request_id is not None and item_id is not None
                ]
                if remembered:
                    for request_id, _, _, _ in remembered:
                        self.seen.add(request_id, ts)
                    conn.executemany(_DEDUPE_UPSERT, remembered)
                for sql, params in also:
                    conn.execute(sql, params)
            outbox.depth = depth
            outbox.acked_deleted(acked)
            outbox.committed_tail(
                [
                    OutboxItem(item_id, topic, payload, 1, False, "reply", None, ts, corr)
                    for (_, topic, payload, corr), item_id in zip(replies, out, strict=True)
                    if item_id is not None
                ]
            )
        return out

    def remember_reply(
        self,
        conn: sqlite3.Connection,
        reply: ReplyRecord,
        base: tuple[int, int],
        *,
        force: bool = False,
    ) -> tuple[int, tuple[int, int]]:
        """Queue a reply and remember its request inside the caller's transaction (the
        caller holds the lock); the outbox id and the depth once committed (which the
        caller sets)."""
        item_id, depth = self._outbox.enqueue(
            conn, reply.topic, reply.payload, 1, False, "reply", None, reply.ts,
            reply.correlation, base=base, force=force,
        )  # fmt: skip
        self.seen.add(reply.request_id, reply.ts)
        conn.execute(_DEDUPE_UPSERT, (reply.request_id, reply.topic, reply.payload, reply.ts))
        return item_id, depth
