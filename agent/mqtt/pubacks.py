"""The PUBACK watchdog: QoS 1 publishes still waiting for their PUBACK, and since when.

Owns the bookkeeping behind :class:`~agent.mqtt.client.MqttClient`'s watchdog thread (broker
lists only): MQTT resends unacknowledged publishes only on a new connection, and a clustered
broker's node may drop one for good (NATS: "unable to store ... timeout" while it elects a
stream leader); the agent's outbox and the controller would then wait forever on a live
connection. So a publish unacknowledged for ``puback_timeout_s`` makes the client drop the
connection, and paho sends it again (DUP) on the next one, to the next node.

Must never: import paho or touch the connection itself: it only says a publish is overdue
(``on_stale``); the client decides what to do about it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class PubackWatchdog:
    """Send times of unacknowledged QoS 1 publishes (mid -> monotonic time), and a thread that
    looks at the oldest once a second. Every method is safe from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._unacked: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def sent(self, mid: int) -> None:
        """A QoS 1 publish left; its PUBACK is due."""
        with self._lock:
            self._unacked.setdefault(mid, self._clock())

    def done(self, mid: int) -> None:
        """Its PUBACK came, or the publish was dropped (``MqttClient.forget``)."""
        with self._lock:
            self._unacked.pop(mid, None)

    def restart(self) -> None:
        """A new connection: paho resends what is unacknowledged, so the clock restarts."""
        with self._lock:
            now = self._clock()
            self._unacked = dict.fromkeys(self._unacked, now)

    def overdue(self, limit: float, connected: Callable[[], bool]) -> float | None:
        """Seconds the oldest publish has waited, when over ``limit`` on a live connection;
        then every one starts afresh (paho resends them all on the next connection)."""
        now = self._clock()
        with self._lock:
            oldest = min(self._unacked.values(), default=now)
            stale = connected() and now - oldest > limit
            if stale:
                self._unacked = dict.fromkeys(self._unacked, now + limit)
        return now - oldest if stale else None

    def start(
        self, limit: float, connected: Callable[[], bool], on_stale: Callable[[float], None]
    ) -> None:
        """Look once a second, in a daemon thread, until :meth:`stop`."""
        self._stop.clear()

        def watch() -> None:
            while not self._stop.wait(1.0):
                waited = self.overdue(limit, connected)
                if waited is not None:
                    on_stale(waited)

        threading.Thread(target=watch, name="mqtt-puback", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
