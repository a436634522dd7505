"""Delivery of the outbox: hands queued messages to MQTT in order, deletes them once acked.

The store keeps the messages (:mod:`agent.store`); this class only remembers which outbox
item each in-flight MQTT message id stands for. At most ``window`` items are out at once
(awaiting a PUBACK or a retry). Across a reconnect the map is kept: paho resends its
unacknowledged QoS 1 messages with their original ids, and everything past ``last_sent_id``
is handed over again. After a restart the map is empty and the whole outbox is sent from
the start (at-least-once). Used only from the daemon's loop thread.

Delete linger (``ack_linger_s``, the daemon's 0.1 s): a delivered item is not deleted at its
PUBACK but noted (``Store.outbox_ack_later``); the next group commit of replies deletes it
in its own transaction, and :meth:`OutboxPump.flush_acked` (the loop's timer, at
:meth:`acked_due_at`) when none came. It is past ``last_sent_id`` no more, so nothing sends
it again in this process; a restart before the delete sends it again (at least once).
0 deletes at once, in one transaction per run of PUBACKs.

PUBACK reason codes (MQTT 5; 3.1.1 has none and every PUBACK is a success):

- below 0x80: delivered; the item is deleted (or noted for deletion: the delete linger).
- :data:`PERMANENT_REFUSALS` (0x87 not authorized, 0x90 topic name invalid, 0x95 packet
  too large, 0x99 payload format invalid): sending it again cannot help. The item moves to
  the store's dead letters at once, so everything queued behind it still drains.
- any other code >= 0x80 (0x80 unspecified, 0x83 implementation specific, 0x91 packet id
  in use, 0x97 quota exceeded, codes we do not know): transient. The item stays in the
  outbox and is sent again after a full-jitter backoff on the monotonic clock
  (``retry_min_s`` doubling up to ``retry_max_s``); after ``max_refusals`` refusals in all
  it is dead-lettered too. The count lives in memory: a restart starts it again.

Poison messages: some brokers answer a message they cannot take by closing the connection
(NATS, on a topic with ``.``), and the item then heads the outbox forever, resent after
every reconnect. When the connection drops within ``poison_window_s`` of handing an item to
MQTT (or of the reconnect that resent it) and the item is the oldest one still unacknowledged,
it gets a strike; ``poison_disconnects`` strikes (3) move it to the dead letters ("the broker
closed the connection after it, N times") and paho forgets it (``forget``), so what is behind
it drains. A PUBACK clears its strikes. An uplink that fails within seconds of every
reconnect, three times in a row, can dead-letter an innocent item too: the operator's retry
(``edge-agent status --retry-dead-letters``) sends it again.

A refused item sent again goes out after items queued behind it: per-topic order holds for
retained function states because a newer state supersedes (deletes) the refused one, and a
retry of an item no longer queued is dropped.

Delta linger (``delta_linger_s``): a state delta is not handed to MQTT as soon as it is
queued but held back for that long, while the store goes on merging the next commits into
it (``Store.outbox_hold``); the items queued behind it (replies) go out meanwhile. A burst of
state-changing invocations then costs one ``sync/delta`` per linger instead of one per
invocation. The held delta goes out when its time is up, or at once when another sync item
(a newer delta, a snapshot) is due, so deltas and snapshots keep their order. It is in the
outbox all along (durable); a restart sends it like any queued item.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from agent.errors import StoreError
from agent.mqtt import backoff_delay
from agent.store import Store
from agent.store.outbox import OutboxItem
from agent.store.state import DELTA_KIND

#: Outbox kinds of the state sync: kept in order among themselves around a held delta.
SYNC_KINDS = frozenset({DELTA_KIND, "sync_snapshot"})

log = logging.getLogger(__name__)

#: Publishes (topic, payload, qos, retain, correlation) and returns the MQTT message id.
Publish = Callable[[str, bytes, int, bool, bytes | None], int]

#: PUBACK reason codes that no retry can change: the item is dead-lettered at once.
PERMANENT_REFUSALS: dict[int, str] = {
    0x87: "not authorized",
    0x90: "topic name invalid",
    0x95: "packet too large",
    0x99: "payload format invalid",
}


class OutboxPump:
    def __init__(
        self,
        store: Store,
        publish: Publish,
        *,
        window: int = 64,
        max_refusals: int = 5,
        retry_min_s: float = 1.0,
        retry_max_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        poison_disconnects: int = 3,
        poison_window_s: float = 5.0,
        delta_linger_s: float = 0.0,
        ack_linger_s: float = 0.0,
    ) -> None:
        self.store = store
        self.publish = publish
        self.window = window
        self.max_refusals = max_refusals
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.poison_disconnects = poison_disconnects
        self.poison_window_s = poison_window_s
        #: Drops a message id from the MQTT client's own resend queue (``MqttClient.forget``).
        self.forget: Callable[[int], object] | None = None
        self._connected = False
        #: How many items this pump moved to the dead letters (the daemon watches it).
        self.dead_lettered = 0
        self._clock = clock
        self._rng = rng or random.Random()
        self._mid_to_item: dict[int, int] = {}
        self._last_sent_id = 0
        self._refusals: dict[int, int] = {}  # item id -> transient refusals so far
        self._retry_at: dict[int, float] = {}  # item id -> monotonic time to send it again
        self._handed_at: dict[int, float] = {}  # item id -> when MQTT last got it to send
        self._strikes: dict[int, int] = {}  # item id -> disconnects right after handing it
        self.delta_linger_s = delta_linger_s
        self._held_until: float | None = None  # a delta is held back (the store knows which)
        #: Seconds a delivered item's row may wait for a group commit to delete it.
        self.ack_linger_s = ack_linger_s
        self._acked_since: float | None = None  # the first delivered item not deleted since

    @property
    def clock(self) -> Callable[[], float]:
        """The monotonic clock it times retries and lingers on (the daemon hands it its own)."""
        return self._clock

    @property
    def connected(self) -> bool:
        return self._connected

    @connected.setter
    def connected(self, value: bool) -> None:
        """The daemon's view of the connection; a drop may strike the item that caused it."""
        was, self._connected = self._connected, value
        if value and not was:
            now = self._clock()  # paho resends what is unacknowledged on reconnect
            for item_id in self._mid_to_item.values():
                self._handed_at[item_id] = now
        elif was and not value:
            self._disconnected()

    @property
    def last_sent_id(self) -> int:
        """Items up to this id were handed to MQTT in this process: never rewrite them."""
        return self._last_sent_id

    @property
    def in_flight(self) -> int:
        return len(self._mid_to_item)

    @property
    def awaiting_retry(self) -> int:
        return len(self._retry_at)

    @property
    def holding(self) -> bool:
        """A delta is held back (``delta_linger_s``)."""
        return self._held_until is not None

    def idle(self) -> bool:
        """Nothing queued and nothing awaiting an acknowledgement or a retry (what the
        broker took is deleted first)."""
        if self._mid_to_item or self._retry_at:
            return False
        self.flush_acked()
        return self.store.outbox_depth()[0] == 0

    def flush_acked(self) -> None:
        """Delete the items the broker took that no group commit has deleted yet
        (``ack_linger_s`` after the first of them; see :meth:`acknowledged_many`).
        StoreError: they stay noted, and are due again one linger later."""
        if self._acked_since is None and not self.store.outbox_acks_noted():
            return
        self._acked_since = self._clock()  # if this fails: again one linger later, no spin
        self.store.outbox_flush_acked()
        self._acked_since = None

    def acked_due_at(self) -> float | None:
        """When the delivered items noted for deletion must be deleted on their own
        (monotonic), or None when none waits."""
        if self._acked_since is None:
            return None
        return self._acked_since + self.ack_linger_s

    def drain(self) -> None:
        """Send due retries, then the next items in order, keeping at most ``window`` out."""
        if not self.connected:
            return
        self.retry_due()
        room = self.window - len(self._mid_to_item) - len(self._retry_at)
        if room <= 0:
            return
        for item in self.store.outbox_peek(room, after_id=self._last_sent_id, claim=True):
            if item.kind in SYNC_KINDS and self._held_until is not None:
                self.release_held()  # deltas and snapshots never overtake each other
            self._last_sent_id = item.id  # (after a release that may raise StoreError)
            if item.kind == DELTA_KIND and self.delta_linger_s > 0:
                self.store.outbox_hold(item.id)
                self._held_until = self._clock() + self.delta_linger_s
                continue
            self._send(item)

    def _send(self, item: OutboxItem) -> None:
        mid = self.publish(item.topic, item.payload, item.qos, item.retain, item.correlation)
        if item.qos == 0:
            self.store.outbox_ack(item.id)
        else:
            self._mid_to_item[mid] = item.id
            self._handed_at[item.id] = self._clock()

    def release_held(self) -> None:
        """Send the held delta now, as it is after every merge (connected or not: offline,
        paho keeps it for the next connection like any unacknowledged message)."""
        if self._held_until is None:
            return
        item = self.store.outbox_release()  # a StoreError leaves it held, to be sent later
        self._held_until = None
        if item is not None:
            self._send(item)

    def acknowledged(self, mid: int, reason_code: int = 0, reason: str = "Success") -> bool:
        """The broker answered ``mid``: drop, retry or dead-letter its item, then send more.

        False if ``mid`` is not one of ours (a status, heartbeat or direct publish).
        """
        return not self.acknowledged_many([(mid, reason_code, reason)])

    def acknowledged_many(self, acks: list[tuple[int, int, str]]) -> list[int]:
        """A run of PUBACKs ``(mid, reason_code, reason)`` at once: what :meth:`acknowledged`
        does for each, with the delivered items deleted in ONE transaction
        (``Store.outbox_ack_many``) and one :meth:`drain`; the mids that are not ours.

        Every mid is settled in memory first; a refusal is then handled on its own, as
        in :meth:`acknowledged` (a StoreError is raised once the others are handled)."""
        not_ours: list[int] = []
        delivered: list[int] = []
        refused: list[tuple[int, int, str]] = []
        for mid, reason_code, reason in acks:
            item_id = self._mid_to_item.pop(mid, None)
            if item_id is None:
                not_ours.append(mid)
                continue
            self._handed_at.pop(item_id, None)
            self._strikes.pop(item_id, None)
            if reason_code < 0x80:
                self._refusals.pop(item_id, None)
                delivered.append(item_id)
            else:
                refused.append((item_id, reason_code, reason))
        failure: StoreError | None = None
        if delivered and self.ack_linger_s > 0:
            # Deleted with the next group commit of replies (under load: no transaction of
            # their own), or by the loop ``ack_linger_s`` after the first (flush_acked).
            self.store.outbox_ack_later(delivered)
            if self._acked_since is None:
                self._acked_since = self._clock()
        elif delivered:
            try:
                self.store.outbox_ack_many(delivered)
            except StoreError as exc:  # the sweep deletes them once the store recovers
                failure = exc
        for item_id, reason_code, reason in refused:
            try:
                self._refused(item_id, reason_code, reason)
            except StoreError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        if len(not_ours) < len(acks):
            self.drain()
        return not_ours

    def next_retry_at(self) -> float | None:
        """When the next refused item is due again, or the held delta (monotonic); None if
        neither, or offline."""
        if not self.connected or not (self._retry_at or self._held_until is not None):
            return None
        held = [] if self._held_until is None else [self._held_until]
        return min([*self._retry_at.values(), *held])

    def retry_due(self) -> None:
        """Send the held delta once its linger is over, and again every refused item whose
        backoff has passed (only when connected)."""
        if not self.connected:
            return
        now = self._clock()
        if self._held_until is not None and self._held_until <= now:
            self.release_held()
        if not self._retry_at:
            return
        for item_id, due in sorted(self._retry_at.items(), key=lambda kv: (kv[1], kv[0])):
            if due > now:
                continue
            del self._retry_at[item_id]
            item = self.store.outbox_get(item_id)
            if item is None:  # superseded meanwhile: nothing left to send
                self._refusals.pop(item_id, None)
                continue
            mid = self.publish(item.topic, item.payload, item.qos, item.retain, item.correlation)
            self._mid_to_item[mid] = item_id
            self._handed_at[item_id] = now

    def _refused(self, item_id: int, code: int, reason: str) -> None:
        attempts = self._refusals.pop(item_id, 0) + 1
        item = self.store.outbox_get(item_id)
        topic, kind = (item.topic, item.kind) if item is not None else ("?", "?")
        permanent = code in PERMANENT_REFUSALS
        what = f"the broker refused the {kind} message to {topic}: {reason} ({code:#04x})"
        if item is None:
            log.warning("%s; it was superseded meanwhile", what, extra={"topic": topic})
            return
        if permanent or attempts >= self.max_refusals:
            why = "for good" if permanent else f"{attempts} times"
            self.store.outbox_dead_letter(
                item_id, reason_code=code, reason=reason, attempts=attempts, ts=time.time()
            )
            self.dead_lettered += 1
            log.warning(
                "%s; refused %s: moved to the dead letters (edge-agent status shows them)",
                what,
                why,
                extra={"topic": topic},
            )
            return
        self._refusals[item_id] = attempts
        delay = backoff_delay(attempts - 1, self.retry_min_s, self.retry_max_s, self._rng)
        self._retry_at[item_id] = self._clock() + delay
        log.warning(
            "%s; refusal %d of %d, sending it again in %.1fs",
            what,
            attempts,
            self.max_refusals,
            delay,
            extra={"topic": topic},
        )

    def _disconnected(self) -> None:
        """The connection dropped: strike the oldest unacknowledged item handed just before."""
        now = self._clock()
        recent = [
            (handed, item_id, mid)
            for mid, item_id in self._mid_to_item.items()
            if (handed := self._handed_at.get(item_id)) is not None
            and now - handed <= self.poison_window_s
        ]
        if not recent:
            return
        _, item_id, mid = min(recent)
        strikes = self._strikes.get(item_id, 0) + 1
        self._strikes[item_id] = strikes
        item = self.store.outbox_get(item_id)
        topic = item.topic if item is not None else "?"
        if strikes < self.poison_disconnects:
            log.info(
                "the broker closed the connection %.1fs after message %d to %s was sent "
                "(%d of %d before it is set aside)",
                now - self._handed_at[item_id],
                item_id,
                topic,
                strikes,
                self.poison_disconnects,
                extra={"topic": topic},
            )
            return
        reason = f"the broker closed the connection after it, {strikes} times"
        del self._mid_to_item[mid]
        self._handed_at.pop(item_id, None)
        self._strikes.pop(item_id, None)
        if self.forget is not None:
            self.forget(mid)  # or paho sends it again on the next connection
        if self.store.outbox_dead_letter(
            item_id, reason_code=0, reason=reason, attempts=strikes, ts=time.time()
        ):
            self.dead_lettered += 1
        log.warning(
            "%s message to %s: %s: moved to the dead letters (edge-agent status shows them)",
            item.kind if item is not None else "a",
            topic,
            reason,
            extra={"topic": topic},
        )
