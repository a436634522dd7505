"""The agent's durable state: one SQLite database, ``<state_dir>/state.db``, in WAL mode.

Owns: the deployed set (what the cloud asked for and what is on disk), the outbox (every
message the agent owes the cloud), the request-dedupe window and small meta values. This is
the only module of edge-agent that imports :mod:`sqlite3`; every ``sqlite3.Error`` is turned
into :class:`~agent.errors.StoreError` here, with the database path in the message.

Must never: publish, spawn, sleep, or let a sqlite3 object or exception escape. It never
drops an outbox message on its own (see the policy below).

Concurrency: one connection (``check_same_thread=False``) guarded by one ``threading.Lock``
held for the whole of each operation, so the daemon's event loop and Python API threads may
share a :class:`Store`. Every write is one ``BEGIN IMMEDIATE ... COMMIT`` transaction.

Durability: ``durability="normal"`` sets ``synchronous=NORMAL`` (in WAL mode a commit
survives the agent being killed, not necessarily a power cut); ``"full"`` sets
``synchronous=FULL`` (the WAL is fsynced at every commit; survives power loss, slower).

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
   counting what it supersedes, :class:`OutboxFull` is raised and the transaction is rolled
   back: nothing is ever dropped, not even the item that would have been superseded. The
   daemon answers new invocations with ``overloaded`` until the broker drains the queue.
   Lowering the limits below the current depth keeps what is queued and refuses new items.
4. Removal. An item leaves the outbox only by :meth:`Store.outbox_ack` (the broker took
   it), by being superseded, or by :meth:`Store.outbox_dead_letter` (the broker refused it
   for good: it moves, in one transaction, into the ``dead_letter`` table, with the reason
   and a timestamp, so what queued behind it drains).

Dead letters: kept until the operator clears them (:meth:`Store.dead_letters_clear`) or asks
for them to be sent again (:meth:`Store.dead_letters_request_retry` marks them; the agent's
:meth:`Store.dead_letters_requeue` puts them back at the end of the outbox: only the agent
writes the outbox, whose depth it counts in memory). Both work from another process while
the agent runs (WAL). At most ``MAX_DEAD_LETTERS`` are kept; beyond that the oldest go.

Dedupe window: :meth:`Store.dedupe_get` returns a :class:`DedupeEntry` (``reply_topic``,
``reply``, ``ts``) so a duplicate request can be answered on the topic of the original;
:meth:`Store.dedupe_put` replaces an existing entry of the same request id.
:meth:`Store.record_reply` enqueues a reply and remembers its request in one transaction.

Schema migrations are the scripts in :data:`MIGRATIONS`; script ``i`` takes the database
from ``PRAGMA user_version`` ``i`` to ``i + 1``. Append new ones; never edit a released one;
a script must not contain BEGIN or COMMIT (the runner wraps each in its own transaction).
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from agent.contract.statecheck import ChangeVersions
from agent.errors import StoreError
from agent.store.sync import SYNC_SCHEMA, ReplyRecord, SyncTables

__all__ = [
    "MIGRATIONS",
    "SPEC_SCOPES",
    "DeadLetter",
    "DedupeEntry",
    "DeploymentRow",
    "OutboxFull",
    "OutboxItem",
    "Store",
    "salvage_deployments",
    "store_fault",
]

#: Schema scripts; index i upgrades user_version i -> i + 1.
MIGRATIONS: list[str] = [
    # 1: the first schema.
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE spec_source (
        function_id TEXT NOT NULL,
        scope       TEXT NOT NULL CHECK (scope IN ('fleet', 'node')),
        spec_json   TEXT NOT NULL,
        PRIMARY KEY (function_id, scope)
    ) WITHOUT ROWID;

    CREATE TABLE deployment (
        function_id      TEXT PRIMARY KEY,
        version          TEXT NOT NULL,
        sha256           TEXT NOT NULL,
        fingerprint      TEXT NOT NULL,
        spec_json        TEXT NOT NULL,
        code_dir         TEXT NOT NULL,
        state            TEXT NOT NULL,
        error_json       TEXT,
        active_version   TEXT,
        active_code_dir  TEXT,
        active_spec_json TEXT,
        updated_ts       REAL NOT NULL
    ) WITHOUT ROWID;

    -- AUTOINCREMENT: ids are never reused, so id order is delivery order for good.
    CREATE TABLE outbox (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        topic      TEXT NOT NULL,
        payload    BLOB NOT NULL,
        qos        INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
        retain     INTEGER NOT NULL,
        kind       TEXT NOT NULL,
        key        TEXT,
        created_ts REAL NOT NULL,
        -- MQTT 5 Correlation Data to echo on a reply (NULL otherwise).
        correlation BLOB
    );
    CREATE INDEX outbox_by_key ON outbox (key) WHERE key IS NOT NULL;

    CREATE TABLE dedupe (
        request_id  TEXT PRIMARY KEY,
        reply_topic TEXT NOT NULL,
        reply       BLOB NOT NULL,
        ts          REAL NOT NULL
    );
    CREATE INDEX dedupe_by_ts ON dedupe (ts);
    """,
    # 2: the synced state (agent/store/sync.py).
    SYNC_SCHEMA,
    # 3: outbox items the broker refused for good (PUBACK reason code >= 0x80).
    """
    CREATE TABLE dead_letter (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        outbox_id   INTEGER NOT NULL,
        topic       TEXT NOT NULL,
        payload     BLOB NOT NULL,
        qos         INTEGER NOT NULL,
        retain      INTEGER NOT NULL,
        kind        TEXT NOT NULL,
        key         TEXT,
        created_ts  REAL NOT NULL,
        correlation BLOB,
        -- The last refusal: MQTT 5 reason code, its name, and how many refusals in all.
        reason_code INTEGER NOT NULL,
        reason      TEXT NOT NULL,
        attempts    INTEGER NOT NULL,
        dead_ts     REAL NOT NULL,
        -- Set by `edge-agent status --retry-dead-letters`; the agent requeues and deletes.
        retry       INTEGER NOT NULL DEFAULT 0
    );
    """,
]

#: Dead letters kept at most; a flood of refusals must not fill the gateway's disk.
MAX_DEAD_LETTERS = 1000

#: Who can ask for a function: the whole fleet, or this node only (which wins).
SPEC_SCOPES = ("fleet", "node")

_SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}
_BUSY_TIMEOUT_MS = 5000
# Truncate the WAL back to this size after a checkpoint: flash storage is small.
_JOURNAL_SIZE_LIMIT = 8 * 1024 * 1024


class OutboxFull(StoreError):
    """The outbox is at its message or byte bound; nothing was added and nothing dropped.

    Not fatal, unlike other StoreErrors: catch it first and refuse work with ``overloaded``.
    """

    def __init__(self, message: str, *, depth: tuple[int, int]) -> None:
        super().__init__(message)
        self.depth = depth


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


@dataclass(frozen=True)
class DeploymentRow:
    """What is deployed for one function; ``active_*`` keeps serving when a newer one failed."""

    function_id: str
    version: str
    sha256: str
    fingerprint: str
    spec_json: str
    code_dir: str
    state: str
    error_json: str | None
    active_version: str | None
    active_code_dir: str | None
    active_spec_json: str | None
    updated_ts: float


@dataclass(frozen=True)
class DedupeEntry:
    """A request already answered: the reply and the topic it went to."""

    reply_topic: str
    reply: bytes
    ts: float


_DEPLOYMENT_COLUMNS = tuple(f.name for f in fields(DeploymentRow))
_DEPLOYMENT_SELECT = f"SELECT {', '.join(_DEPLOYMENT_COLUMNS)} FROM deployment"
_DEPLOYMENT_UPSERT = (
    f"INSERT INTO deployment ({', '.join(_DEPLOYMENT_COLUMNS)})"
    f" VALUES ({', '.join('?' for _ in _DEPLOYMENT_COLUMNS)})"
    " ON CONFLICT (function_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _DEPLOYMENT_COLUMNS[1:])
)
_OUTBOX_INSERT = (
    "INSERT INTO outbox (topic, payload, qos, retain, kind, key, created_ts, correlation)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_DEDUPE_UPSERT = (
    "INSERT INTO dedupe (request_id, reply_topic, reply, ts) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (request_id) DO UPDATE SET"
    " reply_topic = excluded.reply_topic, reply = excluded.reply, ts = excluded.ts"
)


class Store(SyncTables):
    """The agent's SQLite state. Build it, then :meth:`open` it (or use ``with``)."""

    def __init__(
        self,
        path: str | Path,
        *,
        durability: str = "normal",
        max_messages: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if durability not in _SYNCHRONOUS:
            raise ValueError(f'durability must be "normal" or "full", got {durability!r}')
        self._path = Path(path)
        self._durability = durability
        self._max_messages, self._max_bytes = _checked_limits(max_messages, max_bytes)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        # (count, payload bytes) of the outbox; one tuple so readers never see a torn pair.
        self._depth: tuple[int, int] = (0, 0)
        self._sync_cache: tuple[int, dict[str, Any]] | None = None
        self._sync_changes = ChangeVersions()
        # The highest outbox id handed to MQTT (outbox_peek(claim=True)): never rewritten.
        self._claimed_id = 0
        # A delta the pump claimed and holds back (outbox_hold): still merged into. 0: none.
        self._held_id = 0

    @property
    def path(self) -> Path:
        """Where the database lives."""
        return self._path

    # -- lifecycle ---------------------------------------------------------------------

    #: What :meth:`open` with ``repair=True`` found and did to a damaged database, or None.
    repaired: dict[str, Any] | None = None
    #: True when that repair happened in this :meth:`open` (not at an earlier start).
    repaired_now: bool = False

    def open(self, *, repair: bool = False) -> None:
        """Create the directory (0700) and the database (0600) if needed, then migrate.

        ``repair`` (the daemon at start; never a reader such as ``edge-agent status``): check
        the file first and replace a damaged one (see :meth:`_check_and_repair`); what was
        done is in :attr:`repaired` and kept in meta ``store_repaired`` (JSON).
        """
        with self._lock:
            if self._conn is not None:
                return
            try:
                self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                repaired = self._check_and_repair() if repair else None
                # Created here rather than by SQLite so that it (and the -wal and -shm files,
                # which SQLite gives the same mode) is private whatever the umask.
                os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            except OSError as exc:
                raise StoreError(f"cannot create state database {self._path}: {exc}") from exc
            conn: sqlite3.Connection | None = None
            try:
                conn = sqlite3.connect(
                    self._path,
                    timeout=_BUSY_TIMEOUT_MS / 1000,
                    isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                    check_same_thread=False,
                )
                self._configure(conn)
                self._migrate(conn)
                count, nbytes = conn.execute(
                    "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox"
                ).fetchone()
            except BaseException as exc:
                if conn is not None:
                    conn.close()
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"cannot open state database {self._path}: {exc}") from exc
                raise
            self._conn = conn
            self._depth = (int(count), int(nbytes))
        if repaired is not None:
            self.repaired, self.repaired_now = repaired, True
            self.set_meta("store_repaired", json.dumps(repaired, sort_keys=True))
        elif repair:
            kept = self.get_meta("store_repaired")
            self.repaired = json.loads(kept) if kept else None

    # -- integrity (issue 12: a corrupt store is repaired, not looped on) ------------------

    def _check_and_repair(self) -> dict[str, Any] | None:
        """Check the database before it is used; move a damaged one aside. Lock held.

        ``PRAGMA quick_check`` at every start; the fuller ``PRAGMA integrity_check`` after
        an unclean stop (a ``-wal`` left behind: a clean close checkpoints and deletes it).
        A file SQLite calls corrupt or not a database is renamed, with its ``-wal`` and
        ``-shm``, to ``state.db.corrupt-<UTC time>`` (kept for a post-mortem) and an empty
        one takes its place. Returns what was done (``ts``, ``moved_to``, ``lost_outbox``:
        outbox rows the damaged file still counted, None when it could not be counted,
        ``problems``), or None when the file is sound or new. Any other failure (the disk
        cannot be read) is raised: moving a file aside cannot help then.
        """
        path = self._path
        try:
            if os.stat(path).st_size == 0:
                return None  # new (or created by a previous open): nothing to check
        except FileNotFoundError:
            return None
        wal = Path(f"{path}-wal")
        unclean = wal.exists() and wal.stat().st_size > 0
        check = "integrity_check" if unclean else "quick_check"
        problems: list[str] = []
        lost: int | None = None
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            rows = conn.execute(f"PRAGMA {check}(20)").fetchall()
            problems = [str(r[0]) for r in rows if str(r[0]).lower() != "ok"]
        except sqlite3.DatabaseError as exc:
            if _fault_kind(exc) != "corrupt":
                if conn is not None:
                    conn.close()
                raise StoreError(f"cannot check state database {path}: {exc}") from exc
            problems = [str(exc)]
        if not problems:
            assert conn is not None
            conn.close()
            return None
        if conn is not None:
            with suppress(sqlite3.Error):
                (lost,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
            conn.close()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moved = path.with_name(f"{path.name}.corrupt-{stamp}")
        n = 1
        while moved.exists():
            n += 1
            moved = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        os.rename(path, moved)
        for suffix in ("-wal", "-shm"):  # SQLite pairs them by name: keep them together
            with suppress(FileNotFoundError):
                os.rename(f"{path}{suffix}", f"{moved}{suffix}")
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "moved_to": str(moved),
            "lost_outbox": None if lost is None else int(lost),
            "check": check,
            "problems": problems[:5],
        }

    def probe(self, min_free_bytes: int = 1024 * 1024) -> str | None:
        """Whether the store takes writes again after a fault: None if a small write
        commits and its filesystem has ``min_free_bytes`` free; else why not."""
        try:
            st = os.statvfs(self._path.parent)
        except OSError as exc:
            return f"cannot stat {self._path.parent}: {exc}"
        free = st.f_bavail * st.f_frsize
        if free < min_free_bytes:
            return (
                f"{free // 1024} KiB free on the filesystem of {self._path}"
                f" (waiting for {min_free_bytes // 1024} KiB)"
            )
        try:
            self.set_meta("store.probe_ts", f"{time.time():.3f}")
        except StoreError as exc:
            return str(exc)
        return None

    def close(self) -> None:
        """Close the connection (SQLite checkpoints the WAL); closing twice is harmless."""
        with self._lock:
            conn, self._conn = self._conn, None
            self._sync_cache = None
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    raise StoreError(f"closing {self._path} failed: {exc}") from exc

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

    def _configure(self, conn: sqlite3.Connection) -> None:
        # Any of these is the first read of the file: a non-database fails here.
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StoreError(f"{self._path}: cannot use WAL journal mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[self._durability]}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        (current,) = conn.execute("PRAGMA user_version").fetchone()
        if current > len(MIGRATIONS):
            raise StoreError(
                f"{self._path}: schema version {current} is newer than this agent knows"
                f" ({len(MIGRATIONS)}); refusing to touch it"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            # Python 3.11's executescript commits any open transaction first, so the
            # transaction is part of the script: the schema and user_version move together.
            script = MIGRATIONS[version - 1]
            try:
                conn.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\n;\nPRAGMA user_version = {version};\nCOMMIT;"
                )
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StoreError(
                    f"{self._path}: migration to version {version} failed: {exc}"
                ) from exc

    # -- plumbing ----------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"state database {self._path} is not open")
        return self._conn

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; the caller holds ``self._lock``."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                # The error being raised is the one worth reporting, not a failed rollback.
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"{what} failed on {self._path}: {exc}") from exc
            raise

    def _write(self, what: str, sql: str, params: tuple[Any, ...]) -> int:
        """Run one statement in its own transaction; the number of rows it changed."""
        with self._lock, self._transaction(what) as conn:
            return conn.execute(sql, params).rowcount

    def _read(self, what: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            conn = self._connection()
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{what} failed on {self._path}: {exc}") from exc

    # -- meta --------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or None."""
        rows = self._read("get_meta", "SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""
        self._write(
            "set_meta",
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def meta_items(self, prefix: str) -> dict[str, str]:
        """Every meta key starting with ``prefix`` (a plain prefix, no wildcards) and its value."""
        rows = self._read(
            "meta_items",
            "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?",
            (len(prefix), prefix),
        )
        return {str(key): str(value) for key, value in rows}

    # -- spec sources ------------------------------------------------------------------

    def put_spec_source(self, scope: str, function_id: str, spec_json: str | None) -> None:
        """Remember the spec ``scope`` ("fleet" or "node") asked for; None = it removed it."""
        if scope not in SPEC_SCOPES:
            raise ValueError(f'scope must be "fleet" or "node", got {scope!r}')
        if spec_json is None:
            self._write(
                "put_spec_source",
                "DELETE FROM spec_source WHERE function_id = ? AND scope = ?",
                (function_id, scope),
            )
        else:
            self._write(
                "put_spec_source",
                "INSERT INTO spec_source (function_id, scope, spec_json) VALUES (?, ?, ?)"
                " ON CONFLICT (function_id, scope) DO UPDATE SET spec_json = excluded.spec_json",
                (function_id, scope, spec_json),
            )

    def get_spec_sources(self) -> dict[str, dict[str, str]]:
        """Every remembered spec: function id -> {scope: spec_json}."""
        rows = self._read(
            "get_spec_sources",
            "SELECT function_id, scope, spec_json FROM spec_source ORDER BY function_id, scope",
        )
        sources: dict[str, dict[str, str]] = {}
        for function_id, scope, spec_json in rows:
            sources.setdefault(function_id, {})[scope] = spec_json
        return sources

    # -- deployments -------------------------------------------------------------------

    def put_deployment(self, row: DeploymentRow) -> None:
        """Insert or replace the deployment of ``row.function_id``."""
        params = tuple(getattr(row, c) for c in _DEPLOYMENT_COLUMNS)
        self._write("put_deployment", _DEPLOYMENT_UPSERT, params)

    def get_deployment(self, function_id: str) -> DeploymentRow | None:
        """The deployment of ``function_id``, or None."""
        rows = self._read(
            "get_deployment", f"{_DEPLOYMENT_SELECT} WHERE function_id = ?", (function_id,)
        )
        return DeploymentRow(*rows[0]) if rows else None

    def list_deployments(self) -> list[DeploymentRow]:
        """Every deployment, by function id."""
        rows = self._read("list_deployments", f"{_DEPLOYMENT_SELECT} ORDER BY function_id")
        return [DeploymentRow(*r) for r in rows]

    def delete_deployment(self, function_id: str) -> bool:
        """Forget the deployment of ``function_id``; False if there was none."""
        changed = self._write(
            "delete_deployment", "DELETE FROM deployment WHERE function_id = ?", (function_id,)
        )
        return changed > 0

    # -- outbox ------------------------------------------------------------------------

    def set_limits(self, *, max_messages: int | None = None, max_bytes: int | None = None) -> None:
        """Change the outbox bounds (at reload); queued items are kept even if now over."""
        with self._lock:
            self._max_messages, self._max_bytes = _checked_limits(
                self._max_messages if max_messages is None else max_messages,
                self._max_bytes if max_bytes is None else max_bytes,
            )

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
        """Queue a message before publishing it; its id. Raises OutboxFull (see policy)."""
        _check_qos(qos)
        created_ts = time.time() if ts is None else ts
        with self._lock:
            with self._transaction("outbox_put") as conn:
                item_id, depth = self._enqueue(
                    conn, topic, payload, qos, retain, kind, key, created_ts, correlation
                )
            self._depth = depth
        return item_id

    def _remember_reply(
        self,
        conn: sqlite3.Connection,
        reply: ReplyRecord,
        base: tuple[int, int],
        *,
        force: bool = False,
    ) -> tuple[int, tuple[int, int]]:
        """Queue a reply and remember its request inside the caller's transaction."""
        item_id, depth = self._enqueue(
            conn, reply.topic, reply.payload, 1, False, "reply", None, reply.ts,
            reply.correlation, base=base, force=force,
        )  # fmt: skip
        conn.execute(_DEDUPE_UPSERT, (reply.request_id, reply.topic, reply.payload, reply.ts))
        return item_id, depth

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
        _check_qos(qos)
        with self._lock:
            with self._transaction("record_reply") as conn:
                item_id, depth = self._enqueue(
                    conn, topic, payload, qos, False, "reply", None, ts, correlation
                )
                conn.execute(_DEDUPE_UPSERT, (request_id, topic, payload, ts))
            self._depth = depth
        return item_id

    def _enqueue(
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
        """
        count, nbytes = self._depth if base is None else base
        gone_count = gone_bytes = 0
        if key is not None:
            gone_count, gone_bytes = conn.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox WHERE key = ?",
                (key,),
            ).fetchone()
        new_count = count - gone_count + 1
        new_bytes = nbytes - gone_bytes + len(payload)
        if not force and (new_count > self._max_messages or new_bytes > self._max_bytes):
            raise OutboxFull(
                f"outbox of {self._path} is full: {count} messages, {nbytes} bytes queued"
                f" (limits {self._max_messages} messages, {self._max_bytes} bytes);"
                f" refused a {len(payload)}-byte {kind} message for {topic}",
                depth=(count, nbytes),
            )
        if gone_count:
            conn.execute("DELETE FROM outbox WHERE key = ?", (key,))
        cursor = conn.execute(
            _OUTBOX_INSERT, (topic, payload, qos, int(retain), kind, key, created_ts, correlation)
        )
        assert cursor.lastrowid is not None  # an INSERT into a rowid table always sets it
        return cursor.lastrowid, (new_count, new_bytes)

    def outbox_peek(
        self, limit: int, after_id: int = 0, *, claim: bool = False
    ) -> list[OutboxItem]:
        """Up to ``limit`` queued items with ids above ``after_id``, in delivery order.

        ``claim``: the caller hands them to MQTT now; a state commit (from any thread)
        will not merge a change into one of them afterwards.
        """
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._lock:
            conn = self._connection()
            try:
                rows = conn.execute(
                    "SELECT id, topic, payload, qos, retain, kind, key, created_ts, correlation"
                    " FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"outbox_peek failed on {self._path}: {exc}") from exc
            if claim and rows:
                self._claimed_id = max(self._claimed_id, int(rows[-1][0]))
        return [
            OutboxItem(
                i,
                topic,
                bytes(payload),
                qos,
                bool(retain),
                kind,
                key,
                created_ts,
                None if corr is None else bytes(corr),
            )
            for i, topic, payload, qos, retain, kind, key, created_ts, corr in rows
        ]

    def outbox_ack(self, item_id: int) -> bool:
        """The broker took item ``item_id``: delete it. False if it was not queued."""
        with self._lock:
            with self._transaction("outbox_ack") as conn:
                row = conn.execute(
                    "SELECT length(payload) FROM outbox WHERE id = ?", (item_id,)
                ).fetchone()
                if row is not None:
                    conn.execute("DELETE FROM outbox WHERE id = ?", (item_id,))
            if row is None:
                return False
            count, nbytes = self._depth
            self._depth = (count - 1, nbytes - int(row[0]))
        return True

    def outbox_hold(self, item_id: int) -> None:
        """The pump claimed delta ``item_id`` but holds it back for a while: state commits
        may merge into it again until :meth:`outbox_release` (one held item at a time)."""
        with self._lock:
            self._held_id = item_id

    def outbox_release(self) -> OutboxItem | None:
        """End the hold: the held item as it is now (after every merge), which no commit
        will touch again; None when nothing is held or it is gone (superseded, dead)."""
        with self._lock:
            item_id = self._held_id
            item = self._outbox_get_locked(item_id) if item_id else None  # StoreError: still held
            self._held_id = 0
            return item

    def outbox_get(self, item_id: int) -> OutboxItem | None:
        """Item ``item_id`` if it is still queued (not acknowledged, superseded or dead)."""
        with self._lock:
            return self._outbox_get_locked(item_id)

    def _outbox_get_locked(self, item_id: int) -> OutboxItem | None:
        conn = self._connection()
        try:
            row = conn.execute(
                "SELECT id, topic, payload, qos, retain, kind, key, created_ts, correlation"
                " FROM outbox WHERE id = ?",
                (item_id,),
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"outbox_get failed on {self._path}: {exc}") from exc
        if row is None:
            return None
        i, topic, payload, qos, retain, kind, key, created_ts, corr = row
        return OutboxItem(
            i, topic, bytes(payload), qos, bool(retain), kind, key, created_ts,
            None if corr is None else bytes(corr),
        )  # fmt: skip

    def outbox_dead_letter(
        self, item_id: int, *, reason_code: int, reason: str, attempts: int, ts: float
    ) -> bool:
        """Move item ``item_id`` from the outbox into ``dead_letter``, atomically.

        False if it was no longer queued (superseded meanwhile). Keeps at most
        :data:`MAX_DEAD_LETTERS`, dropping the oldest.
        """
        with self._lock:
            with self._transaction("outbox_dead_letter") as conn:
                row = conn.execute(
                    "SELECT length(payload) FROM outbox WHERE id = ?", (item_id,)
                ).fetchone()
                if row is not None:
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
            count, nbytes = self._depth
            self._depth = (count - 1, nbytes - int(row[0]))
        return True

    def dead_letter_counts(self) -> tuple[int, int]:
        """(dead letters, of which marked for retry); another process may change both."""
        [(count, marked)] = self._read(
            "dead_letter_counts",
            "SELECT count(*), coalesce(sum(retry), 0) FROM dead_letter",
        )
        return int(count), int(marked)

    def dead_letters(self, limit: int = 10) -> list[DeadLetter]:
        """The newest ``limit`` dead letters, newest first."""
        rows = self._read(
            "dead_letters",
            "SELECT id, topic, kind, reason_code, reason, attempts, dead_ts, created_ts,"
            " length(payload) FROM dead_letter ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [DeadLetter(*row) for row in rows]

    def dead_letters_clear(self) -> int:
        """Forget every dead letter (the operator's call); how many were forgotten."""
        return self._write("dead_letters_clear", "DELETE FROM dead_letter", ())

    def dead_letters_request_retry(self) -> int:
        """Mark every dead letter to be sent again by the agent; how many were marked."""
        return self._write("dead_letters_request_retry", "UPDATE dead_letter SET retry = 1", ())

    def dead_letters_requeue(self) -> int:
        """The agent's half of a retry: marked dead letters go back to the end of the outbox.

        Within the outbox bounds: what does not fit stays marked for the next call. A keyed
        item (a retained function state) is requeued only if nothing newer of its key is
        queued, and superseded by anything newer later as usual.
        """
        moved = 0
        with self._lock:
            with self._transaction("dead_letters_requeue") as conn:
                rows = conn.execute(
                    "SELECT id, topic, payload, qos, retain, kind, key, created_ts, correlation"
                    " FROM dead_letter WHERE retry = 1 ORDER BY id"
                ).fetchall()
                depth = self._depth
                for dead_id, topic, payload, qos, retain, kind, key, created_ts, corr in rows:
                    newer = (
                        key is not None
                        and conn.execute("SELECT 1 FROM outbox WHERE key = ?", (key,)).fetchone()
                    )
                    if not newer:
                        try:
                            _, depth = self._enqueue(
                                conn, topic, bytes(payload), qos, bool(retain), kind, key,
                                created_ts, None if corr is None else bytes(corr), base=depth,
                            )  # fmt: skip
                        except OutboxFull:
                            break
                    conn.execute("DELETE FROM dead_letter WHERE id = ?", (dead_id,))
                    moved += 1
            self._depth = depth
        return moved

    def outbox_depth(self) -> tuple[int, int]:
        """(messages, payload bytes) queued; O(1), from counters kept with each commit."""
        return self._depth

    def outbox_has_room(self, n_bytes: int) -> bool:
        """Whether one more message of ``n_bytes`` fits (not counting anything it supersedes)."""
        count, nbytes = self._depth
        return count + 1 <= self._max_messages and nbytes + n_bytes <= self._max_bytes

    # -- request dedupe ----------------------------------------------------------------

    def dedupe_get(self, request_id: str) -> DedupeEntry | None:
        """The reply already sent for ``request_id``, or None if it is new (or pruned)."""
        rows = self._read(
            "dedupe_get",
            "SELECT reply_topic, reply, ts FROM dedupe WHERE request_id = ?",
            (request_id,),
        )
        if not rows:
            return None
        reply_topic, reply, ts = rows[0]
        return DedupeEntry(reply_topic, bytes(reply), ts)

    def dedupe_put(self, request_id: str, reply_topic: str, reply: bytes, ts: float) -> None:
        """Remember the reply to ``request_id``; replaces an earlier entry of the same id."""
        self._write("dedupe_put", _DEDUPE_UPSERT, (request_id, reply_topic, reply, ts))

    def dedupe_prune(self, older_than_ts: float) -> int:
        """Forget requests recorded before ``older_than_ts``; how many were forgotten."""
        return self._write("dedupe_prune", "DELETE FROM dedupe WHERE ts < ?", (older_than_ts,))


def _checked_limits(max_messages: int, max_bytes: int) -> tuple[int, int]:
    if max_messages < 1:
        raise ValueError(f"max_messages must be >= 1, got {max_messages}")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    return max_messages, max_bytes


def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")


def salvage_deployments(path: str | Path) -> list[DeploymentRow]:
    """Best effort, read-only: the deployment rows a damaged database moved aside by
    :meth:`Store.open` still yields, up to the first unreadable page; never raises. Nothing
    here is trusted: the caller keeps only what it can verify."""
    rows: list[DeploymentRow] = []
    for uri in (f"file:{path}?mode=ro", f"file:{path}?immutable=1"):
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            cursor = conn.execute(_DEPLOYMENT_SELECT)
            while (raw := cursor.fetchone()) is not None:
                with suppress(TypeError, ValueError):
                    rows.append(DeploymentRow(*raw))
            return rows
        except sqlite3.Error:
            if rows:
                return rows
        finally:
            if conn is not None:
                conn.close()
    return rows


def store_fault(exc: StoreError) -> str | None:
    """What kind of fault a StoreError from this store is: ``disk full``, ``I/O error``,
    ``corrupt``, ``read-only``, ``locked`` or ``error``; None for the bounded, expected
    refusals (OutboxFull and the like: subclasses, not faults of the store)."""
    if type(exc) is not StoreError:
        return None
    cause = exc.__cause__
    if isinstance(cause, sqlite3.Error):
        return _fault_kind(cause)
    if isinstance(cause, OSError):
        return "disk full" if cause.errno == errno.ENOSPC else "I/O error"
    return "error"


def _fault_kind(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc).lower()
    if name == "SQLITE_FULL" or "disk is full" in text:
        return "disk full"
    if name.startswith("SQLITE_IOERR") or "disk i/o error" in text:
        return "I/O error"
    if (
        name in ("SQLITE_CORRUPT", "SQLITE_NOTADB")
        or "malformed" in text
        or ("not a database" in text)
    ):
        return "corrupt"
    if name.startswith("SQLITE_READONLY"):
        return "read-only"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return "locked"
    return "error"
