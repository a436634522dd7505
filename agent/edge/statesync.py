"""State sync on the agent's side: reported state out, desired state in.

Handler writes, in two steps on the invocation's own thread (consistency rules:
:mod:`agent.exec.context`, :mod:`agent.contract.statecheck`):

1. :meth:`StateSync.apply`, while the invocation still holds its worker: the optimistic
   check and the write set applied to the document *in memory*, so the function's next
   invocation (and any other) starts from it. Microseconds: nothing touches the disk.
2. :meth:`StateSync.persist`, once the worker is free: every write set applied so far, in
   order, in ONE SQLite transaction with its delta and its reply (group commit: concurrent
   invocations share a transaction, and their deltas merge while unsent). Only then is the
   reply published. An invocation that only *read* a version not yet on disk waits for it
   too (:meth:`StateSync.persist_through`): no reply ever shows state that a crash could undo.
   If the disk fails, memory goes back to what is on disk and every invocation whose writes
   (or reads) were not stored fails (``overloaded``, not remembered: retry).

One lock orders the in-memory applies and context refreshes (``context`` only moves
forward); another makes persisting single-file. Everything else runs on the loop.

- Reported state is edge-owned: only handlers change it (``context.state``), and each change
  goes out as a ``sync/delta`` through the outbox, coalesced while offline (see
  :mod:`agent.store.state`).
- Desired state is cloud-owned: the retained ``sync/desired`` is applied when its version
  is newer than the one applied; handlers read it as ``context.desired``. The two are never
  merged (the rule AWS device shadows use between device and cloud).
- ``sync/request`` is answered with a ``sync/snapshot`` through the outbox.
- Restores: the highest version ever committed is also written to ``sync.hwm`` beside the
  database. A ``state.db`` restored from an older backup has a lower version than that mark;
  at boot the agent then moves its version past the mark (versions never repeat) and sends
  an unsolicited snapshot (``request_id`` ``restore-...``) so the cloud resets its mirror.
  A restore of the whole state directory cannot be seen from here; the cloud mirror catches
  it instead (a delta whose ``from_version`` is behind it makes it ask for a snapshot).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from agent.contract import protocol
from agent.contract.statecheck import WHOLE_DOCUMENT, ChangeVersions, conflict_message
from agent.edge.outbox import OutboxPump
from agent.errors import AgentError, OutboxFull, Overloaded, StateConflict, StoreError
from agent.exec.pool import ContextInput
from agent.models import canonical_json, state_checksum
from agent.store import ReplyRecord, StateTooLarge, Store, SyncJob, effective_changes
from agent.store.state import SNAPSHOT_OVERHEAD

log = logging.getLogger(__name__)


class StateSync:
    def __init__(
        self,
        store: Store,
        topics: protocol.Topics,
        outbox: OutboxPump,
        hwm: Path,
        max_payload: int | None = None,
    ) -> None:
        self.max_payload = max_payload
        self.store = store
        self.topics = topics
        self.outbox = outbox
        self.hwm_path = hwm
        #: What invocations start from; replaced (never mutated) on every change.
        self.context = ContextInput()
        self._lock = threading.Lock()
        self._persist_lock = threading.Lock()
        self._hwm_fd: int | None = None
        #: The document as applied in memory (ahead of disk by the pending jobs).
        self._version = 0
        self._doc: dict[str, Any] = {}
        self._changes = ChangeVersions()
        #: Applied, not yet on disk, in order: (ticket, job).
        self._pending: list[tuple[int, SyncJob]] = []
        self._tickets = 0
        #: Tickets up to this one are settled: on disk, or failed (``_failed``).
        self._settled = 0
        self._failed: dict[int, StoreError] = {}
        #: The highest version on disk.
        self.durable_version = 0

    def boot(self) -> None:
        version, _ = self.store.sync_state()
        mark = self._read_hwm()
        if version < mark:
            log.warning(
                "state.db holds sync version %d but version %d was committed before: "
                "restored from an older backup? Moving to %d and sending a snapshot",
                version,
                mark,
                mark + 1,
            )
            self.store.sync_raise_version(mark + 1)
            self._queue_snapshot(f"restore-{uuid.uuid4().hex[:12]}")
        self._load()
        self._write_hwm(self.context.state_version)

    def _load(self) -> None:
        """Memory := what is on disk (at boot, and after a failed persist)."""
        with self._lock:
            self._version, self._doc = self.store.sync_state()
            self.durable_version = self._version
            self._changes = ChangeVersions(floor=self._version)
            desired_version, desired = self.store.desired_state()
            self.context = ContextInput(self._version, self._doc, desired_version, desired)

    def current(self) -> ContextInput:
        """The context an invocation starting now reads (any thread)."""
        return self.context

    def _refresh_desired(self) -> None:
        with self._lock:
            desired_version, desired = self.store.desired_state()
            self.context = ContextInput(self._version, self._doc, desired_version, desired)

    def apply(
        self,
        changes: dict[str, Any],
        reply: ReplyRecord | None,
        *,
        base_version: int | None = None,
        checked: list[str] | None = None,
        read_all: bool = False,
    ) -> int:
        """Step 1 (any thread, worker held): check and apply in memory; a ticket to persist.

        Raises StateConflict when what it read or wrote changed after ``base_version``, and
        StateTooLarge when the document or its delta would not be publishable; each leaves
        everything as it was.
        """
        with self._lock:
            if base_version is not None:
                keys = list(changes) if checked is None else checked
                if base_version > self._version:  # read from memory a failed persist undid
                    conflicts = [WHOLE_DOCUMENT]
                else:
                    conflicts = self._changes.conflicts(base_version, keys, read_all)
                if conflicts:
                    raise StateConflict(conflict_message(conflicts, base_version), keys=conflicts)
            effective = effective_changes(self._doc, changes)
            checksum = ""
            if effective:
                doc = {k: v for k, v in self._doc.items() if k not in effective}
                doc.update({k: v for k, v in effective.items() if v is not None})
                document = canonical_json(doc)
                self._check_size(len(document), effective)
                checksum = hashlib.sha256(document).hexdigest()  # = state_checksum(doc)
                self._version += 1
                self._doc = doc
                self._changes.record(self._version, effective, len(doc))
                old = self.context
                self.context = ContextInput(self._version, doc, old.desired_version, old.desired)
            self._tickets += 1
            job = SyncJob(effective, reply, self._version, checksum)
            self._pending.append((self._tickets, job))
            return self._tickets

    def _check_size(self, document_bytes: int, effective: dict[str, Any]) -> None:
        limit = self.max_payload
        if limit is None:
            return
        if document_bytes + SNAPSHOT_OVERHEAD > limit:
            raise StateTooLarge(
                f"the synced state would be {document_bytes + SNAPSHOT_OVERHEAD} bytes as a "
                f"snapshot, over agent.max_payload_bytes ({limit}); the change was not applied"
            )
        delta_bytes = len(canonical_json(effective)) + SNAPSHOT_OVERHEAD
        if delta_bytes > limit:
            raise StateTooLarge(
                f"the delta for this change is about {delta_bytes} bytes, over "
                f"agent.max_payload_bytes ({limit}); the change was not applied"
            )

    def persist(self, ticket: int, *, own: bool = True) -> None:
        """Step 2 (any thread, worker free): put everything applied so far on disk, in one
        transaction, unless another thread already did. Raises Overloaded when the store
        failed: the ticket's writes (and every later one's) are undone in memory.

        ``own``: the caller applied ``ticket`` (it forgets the failure once told)."""
        with self._persist_lock:
            if ticket > self._settled:
                with self._lock:
                    batch = list(self._pending)
                self._write(batch)
            failed = self._failed.pop(ticket, None) if own else self._failed.get(ticket)
        if failed is not None:
            raise Overloaded(
                f"the invocation's state could not be stored ({failed}); nothing was applied: retry"
            ) from failed

    def persist_through(self, version: int) -> None:
        """An invocation read ``version``: return once it is on disk (Overloaded if it never
        will be: a failed persist undid it)."""
        if version <= self.durable_version:
            return
        with self._lock:
            ticket = next((t for t, job in self._pending if job.to_version >= version), 0)
            gone = version > self._version
        if gone:
            raise Overloaded(
                f"the state this invocation read (version {version}) could not be stored; retry"
            )
        if ticket:
            self.persist(ticket, own=False)

    def _write(self, batch: list[tuple[int, SyncJob]]) -> None:
        """One transaction for ``batch`` (the persist lock is held)."""
        try:
            version = self.store.sync_persist(
                [job for _, job in batch],
                delta_topic=self.topics.sync_delta,
                encode_delta=protocol.encode_sync_delta,
                coalesce_after_id=self.outbox.last_sent_id,
                max_payload=self.max_payload,
            )
        except StoreError as exc:
            log.error("state commits could not be stored, undone in memory: %s", exc)
            with self._lock:
                for ticket, _ in self._pending:
                    self._failed[ticket] = exc
                self._pending.clear()
                self._settled = self._tickets
            self._load()
            return
        with self._lock:
            del self._pending[: len(batch)]
            self._settled = batch[-1][0]
            self.durable_version = version
        self._write_hwm(version)

    def commit(
        self,
        changes: dict[str, Any],
        reply: ReplyRecord | None,
        *,
        base_version: int | None = None,
        checked: list[str] | None = None,
        read_all: bool = False,
    ) -> None:
        """Both steps at once (tests and tools)."""
        ticket = self.apply(
            changes, reply, base_version=base_version, checked=checked, read_all=read_all
        )
        self.persist(ticket)

    def on_desired(self, payload: bytes) -> bool:
        """Apply a newer desired state; True when applied (the status should say so)."""
        if not payload:
            return False  # the retained desired state was cleared: keep what was applied
        try:
            version, data = protocol.decode_sync_desired(payload)
        except AgentError as exc:
            log.warning(
                "ignoring bad sync/desired: %s", exc, extra={"topic": self.topics.sync_desired}
            )
            return False
        if version <= self.context.desired_version:
            log.debug(
                "desired version %d is not newer than %d", version, self.context.desired_version
            )
            return False
        self.store.set_desired_state(version, data)
        self._refresh_desired()
        log.info("applied desired state version %d", version)
        return True

    def on_request(self, payload: bytes) -> None:
        try:
            request_id = protocol.decode_sync_request(payload)
        except AgentError as exc:
            log.warning(
                "ignoring bad sync/request: %s", exc, extra={"topic": self.topics.sync_request}
            )
            return
        self._queue_snapshot(request_id)

    def _queue_snapshot(self, request_id: str) -> None:
        version, data = self.store.sync_state()
        payload = protocol.encode_sync_snapshot(request_id, version, data, state_checksum(data))
        try:
            self.store.outbox_put(self.topics.sync_snapshot, payload, kind="sync_snapshot")
        except OutboxFull as exc:  # the mirror asks again when its request times out
            log.error("outbox full: snapshot for %s not queued: %s", request_id, exc)
            return
        self.outbox.drain()

    def summary(self) -> dict[str, int]:
        return {
            "version": self.context.state_version,
            "desired_version": self.context.desired_version,
        }

    def _read_hwm(self) -> int:
        try:
            return int(self.hwm_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _write_hwm(self, version: int) -> None:
        """One pwrite of a fixed-width line into a file kept open: this runs per commit.

        No fsync: losing the last few marks on power loss only weakens restore detection.
        (A temp file and a rename cost ~0.3 ms per commit; this costs ~2 us.)
        """
        try:
            if self._hwm_fd is None:
                flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                self._hwm_fd = os.open(self.hwm_path, flags, 0o600)
            os.pwrite(self._hwm_fd, f"{version:020d}\n".encode(), 0)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.hwm_path, exc)

    def close(self) -> None:
        if self._hwm_fd is not None:
            os.close(self._hwm_fd)
            self._hwm_fd = None
