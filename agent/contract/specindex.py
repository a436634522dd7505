"""Exact-topic spec delivery for brokers that do not replay retained messages to wildcards.

RabbitMQ before 3.13 (MQTT 3.1.1) delivers a retained message only to a subscription whose
filter is the exact topic: the agent's ``<p>/fleet/functions/+`` then never replays the
specs published before it connected. The controller therefore keeps two retained *indexes*
on exact topics (``<p>/fleet/index``, ``<p>/nodes/<node>/index``: function id -> version),
and :class:`IndexFollower` turns each index the agent receives into exact subscriptions to
the spec topics it lists. The wildcard subscriptions stay, so live publishes (and removals:
an empty retained spec) keep arriving through them exactly as on any broker.

Modes (``mqtt.retained_wildcards``):

- ``"no"``: subscribe to the exact spec topic of every id an index lists.
- ``"auto"``: only to those whose spec has not arrived since this connect. The index
  filters are subscribed after the wildcards in the same SUBSCRIBE, so a broker that does
  replay retained messages to wildcards has delivered every spec before the index: on
  Mosquitto nothing extra is subscribed; on RabbitMQ 3.10 every listed spec is. A broker
  that reorders costs a duplicate delivery, which the agent ignores (same fingerprint).
- ``"yes"``: no indexes at all (``Topics.subscriptions("yes")`` leaves them out).

An id that leaves an index only loses its exact subscription: nothing is undeployed because
of an index (two controllers writing at once may lose one's update). A function goes away
as it always did, by its empty retained spec.

Must never: do I/O, log, or read a clock. The daemon calls it from its loop and applies the
:class:`IndexChange` (subscribe, unsubscribe) to its MQTT client.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from agent.contract.indexes import decode_spec_index
from agent.contract.telemetry import decode_rollcall
from agent.contract.topics import Topics


@dataclass(frozen=True)
class IndexChange:
    """What one index asks of the connection: exact spec topics to (un)subscribe."""

    subscribe: list[str] = field(default_factory=list)
    unsubscribe: list[str] = field(default_factory=list)


class IndexFollower:
    """The agent's bookkeeping from retained indexes to exact spec subscriptions."""

    def __init__(self, topics: Topics, mode: str = "auto") -> None:
        if mode not in ("auto", "no"):
            raise ValueError(f"retained_wildcards: an index follower is for auto or no: {mode!r}")
        self.topics = topics
        self.mode = mode
        #: scope ("fleet" / "node") -> the ids its last index listed.
        self.listed: dict[str, set[str]] = {"fleet": set(), "node": set()}
        #: Exact spec topics subscribed (kept by the MQTT client across reconnects).
        self.subscribed: set[str] = set()
        #: Spec topics delivered (retained or live) since the last connect.
        self._seen: set[str] = set()

    def connected(self) -> None:
        """A new connection: every filter is subscribed again, the replay starts over."""
        self._seen.clear()

    def spec_seen(self, topic: str) -> None:
        """A spec (or its removal) arrived on ``topic``."""
        self._seen.add(topic)

    def spec_topic(self, scope: str, fid: str) -> str:
        if scope == "fleet":
            return self.topics.fleet_function(fid)
        return self.topics.node_function(fid)

    def on_index(self, scope: str, payload: bytes) -> IndexChange:
        """Apply the retained index of ``scope`` ("fleet" or "node"); BadRequest when it does
        not decode (nothing changes then)."""
        ids = set(decode_spec_index(payload))
        before, self.listed[scope] = self.listed[scope], ids
        subscribe = []
        for fid in sorted(ids):
            topic = self.spec_topic(scope, fid)
            if topic in self.subscribed:
                continue
            if self.mode == "auto" and topic in self._seen:
                continue  # replayed over the wildcard: this broker needs no exact filter
            subscribe.append(topic)
        unsubscribe = [
            topic
            for topic in (self.spec_topic(scope, fid) for fid in sorted(before - ids))
            if topic in self.subscribed
        ]
        self.subscribed.update(subscribe)
        self.subscribed.difference_update(unsubscribe)
        return IndexChange(subscribe, unsubscribe)


def rollcall_delay(payload: bytes, rng: random.Random | None = None) -> float:
    """Seconds to wait before answering a roll call: uniform over its window (at most
    ``telemetry.MAX_ROLLCALL_WINDOW_S``), so 10,000 answers spread over it instead of
    arriving at once. BadRequest when the message does not decode."""
    _, window = decode_rollcall(payload)
    return (rng or _rng).uniform(0.0, window)


#: Roll-call answers: a burst of ``ROLLCALL_BURST`` at once (a few edgectl commands in a
#: row each get theirs), then one per ``ROLLCALL_MIN_INTERVAL_S``: whoever can publish to
#: ``<p>/fleet/rollcall`` cannot make an agent publish its status and function states, nor
#: write its store, more often than that.
ROLLCALL_MIN_INTERVAL_S = 2.0
ROLLCALL_BURST = 3


class AnswerBudget:
    """A token bucket for roll-call answers (pure: the caller passes the monotonic time)."""

    def __init__(
        self, burst: int = ROLLCALL_BURST, interval_s: float = ROLLCALL_MIN_INTERVAL_S
    ) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self._tokens = float(burst)
        self._at = -math.inf

    def _refill(self, now: float) -> None:
        if self._at != -math.inf:
            self._tokens = min(self.burst, self._tokens + (now - self._at) / self.interval_s)
        self._at = now

    def due(self, now: float, delay: float) -> float:
        """When to answer a roll call that arrived at ``now`` asking for ``delay``: then,
        or later, once the bucket holds an answer."""
        self._refill(now)
        wait = 0.0 if self._tokens >= 1 else (1 - self._tokens) * self.interval_s
        return now + max(delay, wait)

    def spend(self, now: float) -> None:
        """An answer went out at ``now``."""
        self._refill(now)
        self._tokens = max(0.0, self._tokens - 1)


_rng = random.Random()
