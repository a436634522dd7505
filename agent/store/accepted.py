"""Invocations accepted and not yet answered: the durable record that lets the agent
acknowledge an invoke to the broker before it is answered (issue 13).

Brokers with an ack deadline (NATS's MQTT listener: ``ack_wait``, 30 s by default) deliver
again a QoS 1 message left unacknowledged that long, so acknowledging only once the reply
is ready made a 40 s invocation come back while it ran. Instead the agent writes the request
here (once it has run ``agent.record_accepted_after_s``: a faster one is acknowledged with
its reply, issue 15), then acknowledges it; the record goes when the reply is in the outbox
(or the dedupe table), and an agent that starts finds what a crash left here and runs it
again, so every accepted request is still answered (at least once, as before).

Uses the :class:`~agent.store.core.Store`'s database (:mod:`agent.store.db`: connection,
lock and transactions); its table is created on first use (``CREATE TABLE IF NOT EXISTS``),
outside the db's migrations, so an older agent simply ignores it. Must never be used from
more than the daemon's loop thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.store.core import Store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accepted_invokes (
    request_id     TEXT PRIMARY KEY,
    payload        BLOB NOT NULL,
    response_topic TEXT,
    correlation    BLOB,
    ts             REAL NOT NULL
)
"""


@dataclass(frozen=True)
class AcceptedInvoke:
    """A request as it arrived: enough to handle it again after a restart."""

    request_id: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None
    ts: float


#: Forgets one answered request; :meth:`AcceptedInvokes.done_statement` hands it to the group
#: commit of the replies (``Store.record_replies(also=...)``).
_DONE_SQL = "DELETE FROM accepted_invokes WHERE request_id = ?"
_PUT_SQL = "INSERT OR REPLACE INTO accepted_invokes VALUES (?, ?, ?, ?, ?)"


class AcceptedInvokes:
    """The ``accepted_invokes`` table of a store (open it before use)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._ready = False

    def _ensure(self) -> None:
        if not self._ready:
            self._store.db.write("accepted_invokes schema", _SCHEMA, ())
            self._ready = True

    def put(self, record: AcceptedInvoke) -> None:
        """Record (or replace) an accepted request; durable when this returns."""
        self.put_many([record])

    def put_many(self, records: list[AcceptedInvoke]) -> None:
        """Record (or replace) accepted requests in one transaction; durable when this
        returns (all of them, or none when it raises)."""
        self._ensure()
        rows = [(r.request_id, r.payload, r.response_topic, r.correlation, r.ts) for r in records]
        db = self._store.db
        with db.lock, db.transaction("accepted_invokes put") as conn:
            conn.executemany(_PUT_SQL, rows)

    def done(self, request_id: str) -> bool:
        """Forget a request once its reply is queued; True when it was recorded."""
        self._ensure()
        return self._store.db.write("accepted_invokes done", _DONE_SQL, (request_id,)) > 0

    def done_statement(self, request_id: str) -> tuple[str, tuple[str]]:
        """:meth:`done` as a statement for the caller's transaction (the reply's own)."""
        self._ensure()
        return _DONE_SQL, (request_id,)

    def pending(self) -> list[AcceptedInvoke]:
        """What a previous run accepted and did not answer, oldest first."""
        self._ensure()
        rows = self._store.db.read(
            "accepted_invokes pending",
            "SELECT request_id, payload, response_topic, correlation, ts "
            "FROM accepted_invokes ORDER BY ts",
        )
        return [
            AcceptedInvoke(rid, bytes(payload), topic, None if corr is None else bytes(corr), ts)
            for rid, payload, topic, corr, ts in rows
        ]
