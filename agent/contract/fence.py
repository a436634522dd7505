"""The retained-replay fence: when has the broker delivered everything it retained for us?

A subscriber that needs the retained state before it may act (the fleet controller's view,
the sync mirror's desired versions) subscribes to its filters *and* to a private topic of its
own, then publishes a fresh token there on the same connection. A broker queues the retained
messages of a subscription before it routes a later publish on that connection, so when the
token comes back, every retained message the subscriptions matched has already arrived.

:class:`ReplayFence` is that barrier as a small state machine; its owner does the MQTT:
subscribe to :attr:`~ReplayFence.topic`, publish :meth:`~ReplayFence.arm`'s token there (QoS
1) after each (re)connect, and hand every incoming message to :meth:`~ReplayFence.on_message`
first. It takes no lock: the owner calls it under its own (or from one thread).

Pure: no I/O, no paho.
"""

from __future__ import annotations

import uuid

__all__ = ["ReplayFence"]


class ReplayFence:
    """The barrier on one private ``topic``; :attr:`passed` once the armed token is back."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        #: True once the token of the latest :meth:`arm` came back (until :meth:`reset`).
        self.passed = False
        self._token = b""

    def arm(self) -> bytes:
        """A new token to publish on :attr:`topic`; only its return passes the fence.

        An older token coming back late no longer counts. :attr:`passed` is left as it is:
        call :meth:`reset` where the replay must be awaited again (a lost connection).
        """
        self._token = uuid.uuid4().hex.encode()
        return self._token

    def reset(self) -> None:
        """Not passed any more: the retained state must be replayed (and fenced) again."""
        self.passed = False

    def on_message(self, topic: str, payload: bytes) -> bool:
        """True when the message is the fence's own (the caller drops it); sets
        :attr:`passed` when it carries the armed token."""
        if topic != self.topic:
            return False
        if self._token and payload == self._token:
            self.passed = True
        return True
