"""The state database itself: one SQLite file, ``<state_dir>/state.db``, in WAL mode.

Owns: the connection, the schema and its migrations, open (with the integrity check and
repair of a damaged file), close, the health probe, the small ``meta`` values, and the one
mapping of ``sqlite3.Error`` to :class:`~agent.errors.StoreError` (with the database path in
the message) and of a StoreError to the kind of fault it is (:func:`store_fault`). The other
parts of the store (outbox, deployments, dedupe, state, accepted) run their SQL through
:class:`Database`'s lock, transactions and helpers.

Must never: publish, spawn, sleep, or let a sqlite3 object or exception escape the store.

Concurrency: one connection (``check_same_thread=False``) guarded by one ``threading.Lock``
held for the whole of each operation, so the daemon's event loop and Python API threads may
share a store. Every write is one ``BEGIN IMMEDIATE ... COMMIT`` transaction.

Durability: ``durability="normal"`` sets ``synchronous=NORMAL`` (in WAL mode a commit
survives the agent being killed, not necessarily a power cut); ``"full"`` sets
``synchronous=FULL`` (the WAL is fsynced at every commit; survives power loss, slower).

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from agent.errors import StoreError

__all__ = ["MIGRATIONS", "SYNC_SCHEMA", "Database", "store_fault"]

#: The synced state's table (:mod:`agent.store.state`), added as schema version 2.
SYNC_SCHEMA = """
    CREATE TABLE sync_state (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
"""

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
    # 2: the synced state (agent/store/state.py).
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

SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}
BUSY_TIMEOUT_MS = 5000
# Truncate the WAL back to this size after a checkpoint: flash storage is small.
_JOURNAL_SIZE_LIMIT = 8 * 1024 * 1024

_META_UPSERT = (
    "INSERT INTO meta (key, value) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


class Database:
    """The connection, its lock and its transactions. Build it, then :meth:`open` it."""

    def __init__(self, path: str | Path, *, durability: str = "normal") -> None:
        if durability not in SYNCHRONOUS:
            raise ValueError(f'durability must be "normal" or "full", got {durability!r}')
        self.path = Path(path)
        self._durability = durability
        #: Held for the whole of each operation of every part of the store.
        self.lock = threading.Lock()
        self.conn: sqlite3.Connection | None = None
        #: What :meth:`open` with ``repair=True`` found and did to a damaged database, or None.
        self.repaired: dict[str, Any] | None = None
        #: True when that repair happened in this :meth:`open` (not at an earlier start).
        self.repaired_now = False

    # -- lifecycle ---------------------------------------------------------------------

    def open(self, *, repair: bool = False, loaded: Callable[[sqlite3.Connection], None]) -> None:
        """Create the directory (0700) and the database (0600) if needed, then migrate.

        ``loaded`` runs with the lock held, once the schema is current and before anyone
        else can use the connection (the outbox counts its depth). ``repair`` (the daemon
        at start; never a reader such as ``edge-agent status``): check the file first and
        replace a damaged one (see :func:`check_and_repair`); what was done is in
        :attr:`repaired` and kept in meta ``store_repaired`` (JSON).
        """
        with self.lock:
            if self.conn is not None:
                return
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                repaired = check_and_repair(self.path) if repair else None
                # Created here rather than by SQLite so that it (and the -wal and -shm files,
                # which SQLite gives the same mode) is private whatever the umask.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            except OSError as exc:
                raise StoreError(f"cannot create state database {self.path}: {exc}") from exc
            conn: sqlite3.Connection | None = None
            try:
                conn = sqlite3.connect(
                    self.path,
                    timeout=BUSY_TIMEOUT_MS / 1000,
                    isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                    check_same_thread=False,
                )
                self._configure(conn)
                self._migrate(conn)
                loaded(conn)
            except BaseException as exc:
                if conn is not None:
                    conn.close()
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"cannot open state database {self.path}: {exc}") from exc
                raise
            self.conn = conn
        if repaired is not None:
            self.repaired, self.repaired_now = repaired, True
            self.set_meta("store_repaired", json.dumps(repaired, sort_keys=True))
        elif repair:
            kept = self.get_meta("store_repaired")
            self.repaired = json.loads(kept) if kept else None

    def close(self, *, closed: Callable[[], None]) -> None:
        """Close the connection (SQLite checkpoints the WAL); closing twice is harmless.
        ``closed`` runs with the lock held (the state forgets its cached document)."""
        with self.lock:
            conn, self.conn = self.conn, None
            closed()
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    raise StoreError(f"closing {self.path} failed: {exc}") from exc

    def probe(self, min_free_bytes: int = 1024 * 1024) -> str | None:
        """Whether the store takes writes again after a fault: None if a small write
        commits and its filesystem has ``min_free_bytes`` free; else why not."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError as exc:
            return f"cannot stat {self.path.parent}: {exc}"
        free = st.f_bavail * st.f_frsize
        if free < min_free_bytes:
            return (
                f"{free // 1024} KiB free on the filesystem of {self.path}"
                f" (waiting for {min_free_bytes // 1024} KiB)"
            )
        try:
            self.set_meta("store.probe_ts", f"{time.time():.3f}")
        except StoreError as exc:
            return str(exc)
        return None

    def _configure(self, conn: sqlite3.Connection) -> None:
        # Any of these is the first read of the file: a non-database fails here.
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: cannot use WAL journal mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS[self._durability]}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        (current,) = conn.execute("PRAGMA user_version").fetchone()
        if current > len(MIGRATIONS):
            raise StoreError(
                f"{self.path}: schema version {current} is newer than this agent knows"
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
                    f"{self.path}: migration to version {version} failed: {exc}"
                ) from exc

    # -- plumbing for the parts ------------------------------------------------------------

    def connection(self) -> sqlite3.Connection:
        """The open connection (the caller holds :attr:`lock`); StoreError when closed."""
        if self.conn is None:
            raise StoreError(f"state database {self.path} is not open")
        return self.conn

    @contextmanager
    def transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; the caller holds :attr:`lock`."""
        conn = self.connection()
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
                raise StoreError(f"{what} failed on {self.path}: {exc}") from exc
            raise

    def write(self, what: str, sql: str, params: tuple[Any, ...]) -> int:
        """Run one statement in its own transaction; the number of rows it changed."""
        with self.lock, self.transaction(what) as conn:
            return conn.execute(sql, params).rowcount

    def read(self, what: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """All rows of one query, under the lock."""
        with self.lock:
            return self.read_locked(what, sql, params)

    def read_locked(self, what: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """All rows of one query; the caller holds :attr:`lock`."""
        conn = self.connection()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{what} failed on {self.path}: {exc}") from exc

    # -- meta --------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """The value stored under ``key``, or None."""
        rows = self.read("get_meta", "SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""
        self.write("set_meta", _META_UPSERT, (key, value))

    def meta_items(self, prefix: str) -> dict[str, str]:
        """Every meta key starting with ``prefix`` (a plain prefix, no wildcards) and its value."""
        rows = self.read(
            "meta_items",
            "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?",
            (len(prefix), prefix),
        )
        return {str(key): str(value) for key, value in rows}


def set_meta_in(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Set a meta value inside the caller's transaction."""
    conn.execute(_META_UPSERT, (key, value))


# -- integrity (issue 12: a corrupt store is repaired, not looped on) ----------------------


def check_and_repair(path: Path) -> dict[str, Any] | None:
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
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        rows = conn.execute(f"PRAGMA {check}(20)").fetchall()
        problems = [str(r[0]) for r in rows if str(r[0]).lower() != "ok"]
    except sqlite3.DatabaseError as exc:
        if fault_kind(exc) != "corrupt":
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


# -- what kind of fault ------------------------------------------------------------------


def store_fault(exc: StoreError) -> str | None:
    """What kind of fault a StoreError from this store is: ``disk full``, ``I/O error``,
    ``corrupt``, ``read-only``, ``locked`` or ``error``; None for the bounded, expected
    refusals (StateTooLarge and the like: subclasses, not faults of the store; OutboxFull
    is no StoreError at all)."""
    if type(exc) is not StoreError:
        return None
    cause = exc.__cause__
    if isinstance(cause, sqlite3.Error):
        return fault_kind(cause)
    if isinstance(cause, OSError):
        return "disk full" if cause.errno == errno.ENOSPC else "I/O error"
    return "error"


def fault_kind(exc: sqlite3.Error) -> str:
    """The kind of fault one sqlite3 error is (see :func:`store_fault`)."""
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
