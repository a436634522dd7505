"""The request-dedupe window, and replies queued together with their dedupe row.

Owns the ``dedupe`` table: :meth:`Dedupe.get` returns a :class:`DedupeEntry`
(``reply_topic``, ``reply``, ``ts``) so a duplicate request can be answered on the topic of
the original; :meth:`Dedupe.put` replaces an existing entry of the same request id.
:meth:`Dedupe.record_reply` enqueues a reply and remembers its request in one transaction
(:meth:`Dedupe.remember_reply` does the same inside a transaction the state commit opened).

Must never: queue a reply without its dedupe row in the same transaction, or let a sqlite3
object or exception escape.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from agent.store.db import Database
from agent.store.outbox import Outbox, check_qos

__all__ = ["Dedupe", "DedupeEntry", "ReplyRecord"]

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

    def __init__(self, db: Database, outbox: Outbox) -> None:
        self._db = db
        self._outbox = outbox

    def get(self, request_id: str) -> DedupeEntry | None:
        """The reply already sent for ``request_id``, or None if it is new (or pruned)."""
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
        self._db.write("dedupe_put", _DEDUPE_UPSERT, (request_id, reply_topic, reply, ts))

    def prune(self, older_than_ts: float) -> int:
        """Forget requests recorded before ``older_than_ts``; how many were forgotten."""
        return self._db.write("dedupe_prune", "DELETE FROM dedupe WHERE ts < ?", (older_than_ts,))

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
                conn.execute(_DEDUPE_UPSERT, (request_id, topic, payload, ts))
            self._outbox.depth = depth
        return item_id

    def remember_reply(
        self,
        conn: sqlite3.Connection,
        reply: ReplyRecord,
        base: tuple[int, int],
        *,
        force: bool = False,
    ) -> tuple[int, tuple[int, int]]:
        """Queue a reply and remember its request inside the caller's transaction; the
        outbox id and the depth once committed (which the caller sets)."""
        item_id, depth = self._outbox.enqueue(
            conn, reply.topic, reply.payload, 1, False, "reply", None, reply.ts,
            reply.correlation, base=base, force=force,
        )  # fmt: skip
        conn.execute(_DEDUPE_UPSERT, (reply.request_id, reply.topic, reply.payload, reply.ts))
        return item_id, depth
