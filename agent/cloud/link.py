"""``ControllerLink``: what the parts of a :class:`~agent.cloud.FleetController` share.

One object, made by the controller and handed to each part (spec publishing, rollout waits,
invocations): the lock and the :class:`~agent.cloud.view.FleetView` it guards, the clock,
the counters, the request-id sequence, the MQTT client while connected, and publishing with
the broker's acknowledgement (PUBACKs arrive on the ingest thread, which fills ``acks`` and
wakes the waiters).

Locking: ``cond`` guards the view, ``acks``, ``watchers`` and every part's own tables; the
ingest thread holds it while it applies a batch. Waits release it (``cond.wait``).

Must never: import paho (only agent.mqtt does), start threads, or hold ``cond`` while
calling user code.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from agent.cloud.view import FleetView
from agent.errors import BrokerUnreachable, PublishRefused
from agent.models import EdgeNode
from agent.mqtt import MqttClient, Published

# One logger for the controller and all its parts (the name operators already filter on).
log = logging.getLogger("agent.cloud.controller")

#: An invoke or spec the broker has not acknowledged after this long is published again.
INVOKE_RESEND_S = 3.0


class ControllerLink:
    """The controller's shared state and its acknowledged publish."""

    def __init__(self, view: FleetView, clock: Callable[[], float]) -> None:
        self.view = view
        self.clock = clock
        self.cond = threading.Condition()
        #: The connection while started (set and cleared by the controller).
        self.mqtt: MqttClient | None = None
        #: mid -> its PUBACK (None until it arrives), for publish() to wait on.
        self.acks: dict[int, Published | None] = {}
        #: Set by the ingest thread when a rollout's results may have changed.
        self.watchers: set[threading.Event] = set()
        self.request_ids = itertools.count(1)
        self.stats: Counter[str] = Counter()

    def client(self) -> MqttClient:
        """The connection; BrokerUnreachable before ``start()`` or after ``close()``."""
        client = self.mqtt
        if client is None:
            raise BrokerUnreachable("the fleet controller is not started")
        return client

    def node(self, node_id: str) -> EdgeNode | None:
        """The node as the view knows it now (staleness applied), or None."""
        with self.cond:
            rec = self.view.records.get(node_id)
            return None if rec is None else self.view.refresh(rec, self.clock())

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 30.0
    ) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK: BrokerUnreachable if none comes,
        PublishRefused if it carries a failure reason (MQTT 5: not authorized, ...).

        Without a PUBACK after ``INVOKE_RESEND_S`` the message goes again (a clustered
        broker electing leaders may drop a publish; MQTT resends only after a reconnect):
        what the controller publishes (retained specs and states, desired state) is
        idempotent. The deadline covers a cluster's failover (NATS: up to about 20 s).
        """
        client = self.client()
        deadline = time.monotonic() + timeout

        def send() -> int:
            return client.publish(topic, payload, qos=1, retain=retain)

        with self.cond:
            ack = self.wait_puback(client, send, deadline, lambda: False)
        if ack is None:
            raise BrokerUnreachable(
                f"the broker did not acknowledge the publish to {topic} within {timeout:g}s"
            )
        if ack.refused:  # a spec the ACL forbids is not deployed: say so, never "sent"
            raise PublishRefused(
                f"the broker refused the publish to {topic}: {ack.reason} ({ack.reason_code:#04x})"
            )

    def publish_nowait(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Hand a QoS 1 message to the connection without waiting for the broker (safe from
        ``on_message``, which runs on the ingest thread)."""
        self.client().publish(topic, payload, qos=1, retain=retain)

    def wait_puback(
        self,
        client: MqttClient,
        send: Callable[[], int],
        deadline: float,
        enough: Callable[[], bool],
    ) -> Published | None:
        """Publish with ``send`` and wait (lock held) for the PUBACK, until ``deadline`` or
        ``enough()``; None without one.

        A clustered broker electing new leaders for its message store (NATS after a node
        died) may never acknowledge a publish, and MQTT resends one only after a reconnect:
        so while connected and without a PUBACK after ``INVOKE_RESEND_S`` the message goes
        again (a late PUBACK of an earlier copy is ignored). Everything the controller
        publishes is idempotent or deduplicated by the agent (request ids).
        """
        mid = send()
        self.acks[mid] = None
        try:
            while True:
                resend_at = min(deadline, time.monotonic() + INVOKE_RESEND_S)
                while (ack := self.acks[mid]) is None and not enough():
                    remaining = resend_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self.cond.wait(remaining)
                if ack is not None or enough() or time.monotonic() >= deadline:
                    return ack
                if client.connected:  # while disconnected paho sends the copy it holds
                    del self.acks[mid]
                    mid = send()
                    self.acks[mid] = None
                    self.stats["publishes_resent"] += 1
                    log.info("fleet controller: no PUBACK in %gs; published again", INVOKE_RESEND_S)
        finally:
            self.acks.pop(mid, None)
