"""The cloud's mirror of every node's reported state, kept from ``sync/delta`` messages.

:class:`SyncMirror` is a pure state machine: feed it ``on_message(topic, payload)`` from any
MQTT client subscribed to :meth:`SyncMirror.subscriptions`; whatever it needs to publish
comes back as ``(topic, payload, retain)`` tuples for the caller to send. That keeps it
transport-free (the fleet controller shares one connection for everything) and testable
without a broker. :class:`MirrorClient` is the ready-made pairing with :mod:`agent.mqtt`.

Per node it applies deltas in order and checks the checksum after each one:

- ``from_version == version``: apply; a checksum mismatch means the mirror is wrong, so it
  asks for a snapshot (``sync/request``) and holds further deltas until it arrives.
- ``from_version > version``: a gap (it missed messages, or started late): ask for a
  snapshot.
- ``to_version <= version``: an old or repeated delta (at-least-once delivery): ignored.
- ``from_version < version < to_version``: overlaps what it has: ask for a snapshot.
- ``to_version <= version`` but a different checksum than the mirror recorded for that
  version: the node went back in time (its whole state directory was restored): resync.
- A snapshot (answering its request, or unsolicited after a restore on the node) replaces
  the mirrored document when its checksum is right; a bad one is asked for again, and so
  is one that has not come within ``snapshot_timeout_s``.

Desired state: the mirror also follows the retained ``sync/desired`` topics and the
``sync.desired_version`` that nodes report in their retained status, so ``set_desired``
publishes a version above the last one even after the retained desired topic was cleared.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent import mqtt
from agent.contract import protocol
from agent.contract.fence import ReplayFence
from agent.contract.sync import apply_delta
from agent.errors import AgentError
from agent.models import SyncState, state_checksum

log = logging.getLogger(__name__)

#: (topic, payload, retain) the caller must publish (QoS 1).
Outgoing = tuple[str, bytes, bool]
#: Versions whose checksum the mirror remembers per node.
_HISTORY = 256


@dataclass
class _Node:
    version: int = -1  # -1: nothing mirrored yet
    data: dict[str, Any] = field(default_factory=dict)
    checksum: str = ""
    updated_at: datetime = field(default_factory=datetime.now)
    #: request_id of the snapshot asked for; deltas wait until it arrives.
    pending_request: str | None = None
    pending_since: float = 0.0
    #: checksum of each recent version, to notice a node that went back in time.
    history: OrderedDict[int, str] = field(default_factory=OrderedDict)
    desired_version: int = 0
    desired: dict[str, Any] = field(default_factory=dict)
    snapshots_requested: int = 0


class SyncMirror:
    """Mirrors nodes' reported state (all nodes, or only ``nodes``). Thread-safe."""

    def __init__(
        self,
        prefix: str = "edge",
        nodes: list[str] | None = None,
        *,
        snapshot_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.snapshot_timeout_s = snapshot_timeout_s
        self._clock = clock
        self.fleet = protocol.Topics.for_fleet(prefix)
        self.prefix = prefix
        self._only = set(nodes) if nodes else None
        self._nodes: dict[str, _Node] = {}
        self._lock = threading.Condition()

    def subscriptions(self) -> list[str]:
        p = self.prefix
        return [
            f"{p}/nodes/+/sync/delta",
            f"{p}/nodes/+/sync/snapshot",
            f"{p}/nodes/+/sync/desired",
            f"{p}/nodes/+/status",  # its sync.desired_version survives a cleared desired topic
        ]

    # -- input ------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> list[Outgoing]:
        """Handle one message; returns what must be published in response (maybe nothing)."""
        parsed = protocol.parse_node_topic(self.prefix, topic)
        if parsed is None:
            return []
        node_id, rest = parsed
        if self._only is not None and node_id not in self._only:
            return []
        try:
            if rest == "sync/delta":
                return self._on_delta(node_id, protocol.decode_sync_delta(payload))
            if rest == "sync/snapshot":
                return self._on_snapshot(node_id, protocol.decode_sync_snapshot(payload))
            if rest == "sync/desired" and payload:
                version, data = protocol.decode_sync_desired(payload)
                with self._lock:
                    node = self._node(node_id)
                    if version > node.desired_version:
                        node.desired_version, node.desired = version, data
                    self._lock.notify_all()
            if rest == "status" and payload:
                reported = protocol.decode_status(payload).get("sync")
                if isinstance(reported, dict) and isinstance(reported.get("desired_version"), int):
                    with self._lock:
                        node = self._node(node_id)
                        node.desired_version = max(
                            node.desired_version, reported["desired_version"]
                        )
        except AgentError as exc:
            log.warning("mirror: ignoring bad message on %s: %s", topic, exc)
            if rest == "sync/snapshot":  # maybe the one we wait for: ask again
                with self._lock:
                    node = self._node(node_id)
                    if node.pending_request is not None:
                        return self._request_snapshot(node_id, node)
        return []

    def _node(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node()
        return node

    def _on_delta(self, node_id: str, delta: dict[str, Any]) -> list[Outgoing]:
        start, end = int(delta["from_version"]), int(delta["to_version"])
        with self._lock:
            node = self._node(node_id)
            if node.pending_request is not None:
                if self._clock() - node.pending_since > self.snapshot_timeout_s:
                    log.info("mirror: %s: snapshot request timed out; asking again", node_id)
                    return self._request_snapshot(node_id, node)
                return []  # a snapshot is on its way; it will include this
            if node.version >= 0 and end <= node.version:
                known = node.history.get(end)
                if known is not None and known != delta["checksum"]:
                    log.warning(
                        "mirror: %s: version %d came back with other content (state restored "
                        "on the node?); resyncing", node_id, end,
                    )  # fmt: skip
                    return self._request_snapshot(node_id, node)
                return []  # already have it (a redelivery)
            if start != node.version and not (node.version < 0 and start == 0):
                why = "a gap" if start > node.version else "an overlap"
                log.info(
                    "mirror: %s: delta %d->%d after version %d is %s; asking for a snapshot",
                    node_id, start, end, node.version, why,
                )  # fmt: skip
                return self._request_snapshot(node_id, node)
            data = apply_delta(node.data if node.version >= 0 else {}, delta["changes"])
            if state_checksum(data) != delta["checksum"]:
                log.warning("mirror: %s: checksum mismatch at version %d; resyncing", node_id, end)
                return self._request_snapshot(node_id, node)
            self._set(node, end, data, delta["checksum"])
        return []

    def _set(self, node: _Node, version: int, data: dict[str, Any], checksum: str) -> None:
        """Record a new mirrored version; the caller holds the lock."""
        node.version, node.data, node.checksum = version, data, checksum
        node.updated_at = datetime.now()
        node.history[version] = checksum
        while len(node.history) > _HISTORY:
            node.history.popitem(last=False)
        self._lock.notify_all()

    def _on_snapshot(self, node_id: str, snap: dict[str, Any]) -> list[Outgoing]:
        with self._lock:
            node = self._node(node_id)
            ours = snap["request_id"] == node.pending_request
            restore = str(snap["request_id"]).startswith("restore-")
            if not (ours or restore or snap["version"] > node.version):
                return []  # someone else's snapshot of what we already have
            if state_checksum(snap["data"]) != snap["checksum"]:
                log.warning("mirror: %s: snapshot with a wrong checksum; asking again", node_id)
                return self._request_snapshot(node_id, node)
            if ours or restore:
                node.history.clear()  # what came before may have been undone on the node
            node.pending_request = None
            self._set(node, snap["version"], snap["data"], snap["checksum"])
        return []

    def _request_snapshot(self, node_id: str, node: _Node) -> list[Outgoing]:
        node.pending_request = f"mirror-{uuid.uuid4().hex[:16]}"
        node.pending_since = self._clock()
        node.snapshots_requested += 1
        topic = self.fleet.node(node_id).sync_request
        return [(topic, protocol.encode_sync_request(node.pending_request), False)]

    def resync(self, node_id: str) -> list[Outgoing]:
        """Ask a node for a snapshot now (e.g. after the mirror itself restarted)."""
        with self._lock:
            return self._request_snapshot(node_id, self._node(node_id))

    # -- output ------------------------------------------------------------------------------

    def get(self, node_id: str) -> SyncState | None:
        """The mirrored state of a node (a copy), or None before anything arrived."""
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None or node.version < 0:
                return None
            return SyncState(node.version, copy.deepcopy(node.data), node.checksum, node.updated_at)

    def nodes(self) -> list[str]:
        with self._lock:
            return sorted(n for n, s in self._nodes.items() if s.version >= 0)

    def snapshots_requested(self, node_id: str) -> int:
        with self._lock:
            node = self._nodes.get(node_id)
            return node.snapshots_requested if node else 0

    def desired(self, node_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            node = self._nodes.get(node_id) or _Node()
            return node.desired_version, copy.deepcopy(node.desired)

    def set_desired(self, node_id: str, data: dict[str, Any]) -> Outgoing:
        """The retained ``sync/desired`` message of the next desired version, to publish."""
        with self._lock:
            node = self._node(node_id)
            node.desired_version += 1
            node.desired = copy.deepcopy(data)
            version = node.desired_version
        payload = protocol.encode_sync_desired(version, data)
        return self.fleet.node(node_id).sync_desired, payload, True

    def wait_for(
        self, node_id: str, predicate: Callable[[SyncState], bool], timeout: float
    ) -> SyncState | None:
        """Block until the node's mirrored state satisfies ``predicate`` (None at timeout)."""
        with self._lock:
            result: SyncState | None = None

            def ready() -> bool:
                nonlocal result
                node = self._nodes.get(node_id)
                if node is None or node.version < 0:
                    return False
                state = SyncState(node.version, node.data, node.checksum, node.updated_at)
                if predicate(state):
                    result = SyncState(
                        state.version, copy.deepcopy(state.data), state.checksum, state.updated_at
                    )
                    return True
                return False

            self._lock.wait_for(ready, timeout)
            return result


class MirrorClient:
    """A :class:`SyncMirror` on its own MQTT connection (for scripts and tests)."""

    def __init__(
        self, settings: mqtt.MqttSettings, prefix: str = "edge", nodes: list[str] | None = None
    ) -> None:
        self.mirror = SyncMirror(prefix, nodes)
        # The retained-replay fence (agent.contract.fence): when it comes back, desired versions and
        # statuses are known, before start() returns.
        self._fence = ReplayFence(f"{prefix}/mirror/{uuid.uuid4().hex[:16]}/fence")
        self._fenced = threading.Event()
        self.client = mqtt.MqttClient(
            settings,
            self._on_event,
            subscriptions=[*self.mirror.subscriptions(), self._fence.topic],
            manual_ack=False,
        )

    def _on_event(self, event: Any) -> None:
        # Runs on paho's thread: the mirror is a quick, locked state machine, and its
        # answers are publishes (paho queues them): nothing here blocks.
        if isinstance(event, mqtt.Message):
            if self._fence.on_message(event.topic, event.payload):
                if self._fence.passed:
                    self._fenced.set()
                return
            for topic, payload, retain in self.mirror.on_message(event.topic, event.payload):
                self.client.publish(topic, payload, qos=1, retain=retain)

    def start(self, timeout: float = 10.0) -> MirrorClient:
        """Connect and read what is retained (statuses, desired states) before returning."""
        self.client.start()
        if not self.client.wait_connected(timeout):
            raise AgentError(f"mirror could not connect within {timeout:g}s")
        self.client.publish(self._fence.topic, self._fence.arm(), qos=1)
        if not self._fenced.wait(timeout):
            raise AgentError(f"mirror did not receive the retained messages within {timeout:g}s")
        return self

    def set_desired(self, node_id: str, data: dict[str, Any]) -> int:
        topic, payload, retain = self.mirror.set_desired(node_id, data)
        self.client.publish(topic, payload, qos=1, retain=retain)
        return self.mirror.desired(node_id)[0]

    def resync(self, node_id: str) -> None:
        for topic, payload, retain in self.mirror.resync(node_id):
            self.client.publish(topic, payload, qos=1, retain=retain)

    def get(self, node_id: str) -> SyncState | None:
        return self.mirror.get(node_id)

    def stop(self) -> None:
        self.client.stop()
