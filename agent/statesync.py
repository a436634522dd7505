"""State sync on the agent's side: reported state out, desired state in.

Threads: :meth:`StateSync.commit` runs on invocation threads (while the invocation still
holds its worker, so the function's next invocation starts from it); everything else runs
on the loop. One lock orders commits and context refreshes, so ``context`` only moves
forward. Consistency rules: :mod:`agent.context` and :mod:`agent.statecheck`.

- Reported state is edge-owned: only handlers change it (``context.state``), and each change
  goes out as a ``sync/delta`` through the outbox, coalesced while offline (see
  :mod:`agent.store.sync`).
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

import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from agent import protocol
from agent.errors import AgentError
from agent.models import state_checksum
from agent.outbox import OutboxPump
from agent.pool import ContextInput
from agent.store import OutboxFull, ReplyRecord, Store, SyncCommit

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
        self._hwm_fd: int | None = None

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
        self._refresh()
        self._write_hwm(self.context.state_version)

    def current(self) -> ContextInput:
        """The context an invocation starting now reads (any thread)."""
        return self.context

    def _refresh(self) -> None:
        with self._lock:
            version, data = self.store.sync_view()
            desired_version, desired = self.store.desired_state()
            self.context = ContextInput(version, data, desired_version, desired)

    def commit(
        self,
        changes: dict[str, Any],
        reply: ReplyRecord | None,
        *,
        base_version: int | None = None,
        checked: list[str] | None = None,
        read_all: bool = False,
    ) -> SyncCommit | None:
        """Apply an invocation's write set with its reply, atomically. Any thread.

        Raises StateConflict when what it read or wrote changed after ``base_version``,
        OutboxFull and StateTooLarge; each writes nothing.
        """
        with self._lock:
            commit = self.store.sync_commit(
                changes,
                delta_topic=self.topics.sync_delta,
                encode_delta=protocol.encode_sync_delta,
                coalesce_after_id=self.outbox.last_sent_id,
                reply=reply,
                max_payload=self.max_payload,
                base_version=base_version,
                checked=checked,
                read_all=read_all,
            )
            if commit is not None:
                version, data = self.store.sync_view()
                old = self.context
                self.context = ContextInput(version, data, old.desired_version, old.desired)
                self._write_hwm(commit.to_version)
        return commit

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
        self._refresh()
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
