"""Delivery of the outbox: hands queued messages to MQTT in order and deletes them on PUBACK.

The store keeps the messages (:mod:`agent.store`); this class only remembers which outbox
item each in-flight MQTT message id stands for. At most ``window`` items are out at once.
Across a reconnect the map is kept: paho resends its unacknowledged QoS 1 messages with
their original ids, and everything past ``last_sent_id`` is handed over again. After a
restart the map is empty and the whole outbox is sent from the start (at-least-once).
Used only from the daemon's loop thread.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.store import Store

#: Publishes (topic, payload, qos, retain, correlation) and returns the MQTT message id.
Publish = Callable[[str, bytes, int, bool, bytes | None], int]


class OutboxPump:
    def __init__(self, store: Store, publish: Publish, *, window: int = 64) -> None:
        self.store = store
        self.publish = publish
        self.window = window
        self.connected = False
        self._mid_to_item: dict[int, int] = {}
        self._last_sent_id = 0

    @property
    def last_sent_id(self) -> int:
        """Items up to this id were handed to MQTT in this process: never rewrite them."""
        return self._last_sent_id

    @property
    def in_flight(self) -> int:
        return len(self._mid_to_item)

    def idle(self) -> bool:
        """Nothing queued and nothing awaiting an acknowledgement."""
        return not self._mid_to_item and self.store.outbox_depth()[0] == 0

    def drain(self) -> None:
        """Hand the next items to MQTT, in order, keeping at most ``window`` unacknowledged."""
        if not self.connected:
            return
        room = self.window - len(self._mid_to_item)
        if room <= 0:
            return
        for item in self.store.outbox_peek(room, after_id=self._last_sent_id, claim=True):
            mid = self.publish(item.topic, item.payload, item.qos, item.retain, item.correlation)
            self._last_sent_id = item.id
            if item.qos == 0:
                self.store.outbox_ack(item.id)
            else:
                self._mid_to_item[mid] = item.id

    def acknowledged(self, mid: int) -> bool:
        """The broker acknowledged ``mid``: drop its item and send more. False if not ours."""
        item_id = self._mid_to_item.pop(mid, None)
        if item_id is None:
            return False
        self.store.outbox_ack(item_id)
        self.drain()
        return True
