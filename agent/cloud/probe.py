"""``WildcardProbe``: does the broker replay retained messages to wildcard subscriptions?

Most brokers do; RabbitMQ before 3.13 does not, and there the controller reads the specs the
indexes list on their exact topics and calls the roll (``retained_wildcards="no"``, see
``FleetController.start``). The probe answers the question for ``"auto"``.

Must never: leave its retained probe message behind, or block in :meth:`on_message` (the
ingest thread calls it with the lock held).
"""

from __future__ import annotations

import time
import uuid

from agent.cloud.link import ControllerLink, log
from agent.mqtt import Message


class WildcardProbe:
    """A retained probe and a live fence on the controller's own topics under ``base``."""

    def __init__(self, link: ControllerLink, base: str) -> None:
        self._link = link
        self.topic, self.fence_topic = f"{base}/probe/r", f"{base}/probe/f"
        self._nonce = b""
        self._result: bool | None = None

    def on_message(self, msg: Message) -> bool:
        """True (lock held) when ``msg`` is the probe's own: it decides the answer."""
        if msg.topic not in (self.topic, self.fence_topic):
            return False
        if msg.payload == self._nonce and self._result is None:
            self._result = msg.topic == self.topic and msg.retain
        return True

    def run(self, timeout: float, qos: int) -> bool:
        """True when the broker replays a retained message to a wildcard subscription.

        Publishes a retained probe on this controller's own topic, subscribes to a wildcard
        that matches it, then publishes a live *fence* on the same wildcard: the broker
        queues retained messages for a subscription before it routes a later publish, so
        the fence arriving first means no replay (RabbitMQ before 3.13). The probe is
        cleared afterwards. No answer within ``timeout``: False (the compatible choice).
        """
        link = self._link
        client = link.client()
        nonce = uuid.uuid4().hex.encode()
        with link.cond:
            self._nonce, self._result = nonce, None
        deadline = time.monotonic() + timeout
        link.publish(self.topic, nonce, retain=True, timeout=timeout)
        wildcard = self.topic.rsplit("/", 1)[0] + "/+"
        try:
            client.subscribe([wildcard], qos=qos)
            link.publish(self.fence_topic, nonce, timeout=max(0.1, deadline - time.monotonic()))
            with link.cond:
                while self._result is None and time.monotonic() < deadline:
                    link.cond.wait(deadline - time.monotonic())
                result = self._result
        finally:
            client.unsubscribe([wildcard])
            link.publish(self.topic, b"", retain=True, timeout=timeout)
        if result is None:
            log.warning("fleet controller: the retained-wildcard probe did not come back")
        log.info("fleet controller: broker replays retained messages to wildcards: %s", result)
        return bool(result)
