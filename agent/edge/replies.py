"""Answering invocations: reply payloads, and putting each reply where it is owed.

Owns: the bytes of a success reply (or the error that replaces it: not JSON, over
``agent.max_payload_bytes``; a worker's JSON result is framed in as it is, not parsed and
dumped again) and of an error reply; queueing a reply per target in the
outbox (the first also remembered for dedupe when the outcome is final); the group commit
of the replies of a run of finished invocations (:meth:`Replies.send_many`: one
transaction for all of them, issue 15).

Outbox full: a reply that finds the outbox full (or a failing store) is published directly
when connected and otherwise logged as lost with its request id: the only loss path, and
a loud one.

Must never: acknowledge incoming messages (the caller does, once the reply is durable) or
decide whether an invocation runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.config import Config
from agent.contract import protocol
from agent.edge.outbox import OutboxPump
from agent.edge.store_faults import StoreFaults
from agent.edge.uplink import Uplink
from agent.errors import AgentError, EdgeExecutionError, HandlerError, StoreError, error_to_dict
from agent.exec.pool import InvokeResult
from agent.store import OutboxFull, Store
from agent.store.dedupe import QueuedReply, Statement

log = logging.getLogger(__name__)

#: Where a reply goes: (reply topic, MQTT 5 correlation data).
Target = tuple[str, bytes | None]


@dataclass(frozen=True)
class Answer:
    """A finished invocation's reply, ready to be written: its bytes, where it goes, and
    whether the first target's copy is remembered for duplicates."""

    rid: str
    payload: bytes
    targets: list[Target]
    remember: bool


class Replies:
    """Builds and queues replies; used from the loop thread (``ok_reply`` from any)."""

    def __init__(
        self,
        settings: Callable[[], Config],
        *,
        store: Store,
        outbox: OutboxPump,
        uplink: Uplink,
        faults: StoreFaults,
    ) -> None:
        self._settings = settings  # the running config (a reload replaces it)
        self._store = store
        self._outbox = outbox
        self._uplink = uplink
        self._faults = faults

    def ok_reply(
        self, request: protocol.InvokeRequest, result: InvokeResult
    ) -> tuple[bytes, EdgeExecutionError | None]:
        """The success reply's bytes, or the error that replaces it (too big, not JSON)."""
        config = self._settings()
        rid, fid = request.request_id, request.function_id
        if result.raw is not None:  # the worker's JSON, checked by the pool: framed as is
            payload = protocol.encode_ok_reply_raw(
                rid,
                fid,
                result.raw,
                duration_ms=round(result.duration_ms, 3),
                cold_start=result.cold_start,
                node_id=config.node.id,
            )
        else:
            try:
                payload = protocol.encode_reply(
                    rid,
                    fid,
                    ok=True,
                    result=result.value,
                    duration_ms=round(result.duration_ms, 3),
                    cold_start=result.cold_start,
                    node_id=config.node.id,
                )
            except (TypeError, ValueError) as exc:
                return b"", HandlerError(str(exc))
        limit = config.agent.max_payload_bytes
        if len(payload) > limit:  # a broker with max_packet_size would drop us for it
            return b"", HandlerError(
                f"the result of {fid} is {len(payload)} bytes as a reply, over "
                f"agent.max_payload_bytes ({limit})"
            )
        return payload, None

    def error_payload(
        self, rid: str | None, fid: str | None, error: BaseException, duration_ms: float = 0.0
    ) -> bytes:
        return protocol.encode_reply(
            rid,
            fid,
            ok=False,
            error=error_to_dict(error),
            duration_ms=round(duration_ms, 3),
            cold_start=False,
            node_id=self._settings().node.id,
        )

    def error(
        self,
        rid: str | None,
        fid: str | None,
        targets: list[Target],
        error: BaseException,
        *,
        durable: bool,
    ) -> None:
        """Answer with ``error`` (never remembered for dedupe: a retry runs again)."""
        payload = self.error_payload(rid, fid, error)
        self.send(rid, payload, targets, durable=durable, remember=False)

    def send(
        self,
        rid: str | None,
        payload: bytes,
        targets: list[Target],
        *,
        durable: bool,
        remember: bool,
        drain: bool = True,
    ) -> None:
        """Queue a reply per target in the outbox (the first also remembered for dedupe)."""
        now = time.time()
        for index, (topic, correlation) in enumerate(targets):
            if durable:
                try:
                    if remember and index == 0 and rid is not None:
                        self._store.record_reply(
                            rid, topic, payload, ts=now, correlation=correlation
                        )
                    else:
                        self._store.outbox_put(
                            topic, payload, kind="reply", ts=now, correlation=correlation
                        )
                    continue
                except OutboxFull as exc:
                    log.error("outbox full for the reply to %s: %s", rid, exc)
                except StoreError as exc:  # answered all the same, without the outbox
                    if not self._faults.failed(exc, f"queueing the reply to {rid}"):
                        raise
            self._publish_direct(rid, topic, payload, correlation)
        if drain:
            self._outbox.drain()

    def _publish_direct(
        self, rid: str | None, topic: str, payload: bytes, correlation: bytes | None
    ) -> None:
        """A reply the outbox could not take: straight to MQTT when connected, else lost."""
        if self._uplink.live:
            self._uplink.publish(topic, payload, qos=1, correlation=correlation)
        else:
            log.error(
                "reply to %s LOST: outbox full and broker unreachable",
                rid,
                extra={"request_id": rid},
            )

    def send_many(self, answers: Sequence[Answer], *, also: Sequence[Statement] = ()) -> bool:
        """Group commit: every reply of ``answers`` (one per target, as :meth:`send` with
        ``durable=True``) and the ``also`` statements in ONE transaction; no drain.

        A reply the outbox has no room for is refused alone and published directly when
        connected (else logged as lost), as in :meth:`send`. False when the group could not
        be written (the store fails now, or failed on it: nothing was written); the caller
        then answers each one with :meth:`send`, as before.
        """
        if self._faults.reason is not None:
            return False
        rows: list[QueuedReply] = []
        owners: list[str] = []  # the request each row answers
        for answer in answers:
            for index, (topic, correlation) in enumerate(answer.targets):
                owners.append(answer.rid)
                remembered = answer.rid if answer.remember and index == 0 else None
                rows.append((remembered, topic, answer.payload, correlation))
        if not rows and not also:
            return True
        try:
            outcomes = self._store.record_replies(rows, ts=time.time(), also=also)
        except StoreError:  # rolled back: each goes through send(), which notes a fault
            return False
        for owner, (_, topic, payload, correlation), item_id in zip(
            owners, rows, outcomes, strict=True
        ):
            if item_id is not None:
                continue
            log.error("outbox full for the reply to %s", owner)
            try:  # the group is committed: one failed publish must not undo the others
                self._publish_direct(owner, topic, payload, correlation)
            except AgentError as exc:
                log.error("reply to %s LOST: outbox full and %s", owner, exc)
        return True
