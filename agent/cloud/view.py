"""The fleet as a controller sees it: a pure state machine over what the nodes publish.

Owns the controller's picture of every node (:class:`NodeRecord`: the seed's ``EdgeNode``
plus its last heartbeat and the time it was last heard from), every node's retained function
states, and the retained fleet and per-node specs. It is fed one message at a time with
:meth:`FleetView.ingest` and answers questions (``status_of``, ``nodes``) for a ``now`` the
caller passes.

Node status, in order of precedence (see docs/scaling.md and the README's *Fleet controller*):

- ``OFFLINE``: the retained status says ``offline`` (the Last Will fired, or the agent shut
  down cleanly), or nothing (status or heartbeat) was heard for ``misses`` heartbeat
  intervals. The interval is the heartbeat's ``interval_s`` field when it carries one (an
  extra field; the status's ``heartbeat_interval_s`` until a heartbeat comes), else the
  controller's configured interval.
- The Last Will can be lost (a clustered broker's node dies together with the agent's
  connection), so a retained ``online`` status is not taken as "heard now": when it carries
  ``status_refresh_s`` (the agent republishes it that often, with a fresh ``ts``), the node
  was last heard at its ``ts`` and counts as OFFLINE once ``ts`` is older than ``misses``
  intervals plus ``status_refresh_s`` (the refresh it may have been about to send). A view
  that only reads retained messages (``edgectl nodes``) needs nothing else; a live view is
  exact again from the first heartbeat. The caller passes the wall clock for this
  (``wall``): ``ts`` is the gateway's clock, so gateways must keep theirs in sync (NTP).
- ``DEGRADED`` / ``SYNCING``: the status message or the latest heartbeat says so.
- ``DEGRADED`` also when the latest heartbeat shows a function whose last deployment
  ``failed`` (its code did not load here), or an outbox of ``degraded_outbox`` messages or
  more (the node is not getting its replies and states acknowledged). A ``rejected`` spec
  does not degrade a node: the old version still serves and the fault is the spec's.
- ``ONLINE`` otherwise.

A heartbeat arriving after an ``offline`` status does not bring a node back: an agent
always publishes ``online`` on (re)connect before its first heartbeat, so such a heartbeat
is one that was in flight when the connection died.

Must never: do I/O, log, read a clock (``now`` is the caller's monotonic seconds), or
block. The controller (``agent.cloud.controller``) drives it from one thread.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from agent.contract import protocol
from agent.errors import AgentError, BadRequest
from agent.models import EdgeNode, EdgeNodeStatus

MessageKind = Literal[
    "status", "heartbeat", "function_state", "fleet_spec", "node_spec", "index", "unknown", "bad"
]

#: Heartbeat intervals of silence after which a node counts as OFFLINE.
HEARTBEAT_MISSES = 3
#: Outbox depth (messages) from which a node counts as DEGRADED.
DEGRADED_OUTBOX = 1000


@dataclass
class NodeRecord:
    """One node: the seed's ``EdgeNode`` (kept current) and what it last told us."""

    node: EdgeNode
    #: ``status`` of the last status message (``online``, ``offline``, ...).
    reported: str
    #: Monotonic time the node was last heard from (a non-offline status or a heartbeat).
    seen_at: float
    #: Heartbeat interval in seconds, for the staleness rule.
    interval_s: float
    #: Extra silence allowed while the last word was a retained status (its refresh period).
    grace_s: float = 0.0
    heartbeat: dict[str, Any] | None = None
    offline_reason: str | None = None


@dataclass
class FleetView:
    """Every node's status, heartbeat and function states, from the retained and live topics."""

    prefix: str
    heartbeat_interval_s: float = 30.0
    misses: int = HEARTBEAT_MISSES
    degraded_outbox: int = DEGRADED_OUTBOX
    records: dict[str, NodeRecord] = field(default_factory=dict)
    #: node id -> function id -> the last function state message.
    states: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: function id -> the retained fleet spec (raw payload as published).
    fleet_specs: dict[str, bytes] = field(default_factory=dict)
    #: (node id, function id) -> the retained per-node spec.
    node_specs: dict[tuple[str, str], bytes] = field(default_factory=dict)
    #: The retained spec indexes (docs/protocol.md, *Brokers without retained wildcards*):
    #: fleet function id -> version, and node id -> its own specs' ids -> versions.
    fleet_index: dict[str, str] = field(default_factory=dict)
    node_index: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Messages ingested, by kind (``bad`` = did not decode); ``last_error`` says why.
    counts: Counter[str] = field(default_factory=Counter)
    last_error: str | None = None

    def __post_init__(self) -> None:
        self.topics = protocol.FleetTopics(self.prefix)
        if not (self.heartbeat_interval_s > 0 and math.isfinite(self.heartbeat_interval_s)):
            raise ValueError(f"heartbeat_interval_s: expected > 0, got {self.heartbeat_interval_s}")
        self._fleet_head = f"{self.prefix}/fleet/functions/"

    def subscriptions(self) -> list[str]:
        """What the view needs: statuses, heartbeats, function states, fleet and node specs."""
        t = self.topics
        return [
            t.status,
            t.heartbeat,
            t.function_state,
            f"{self._fleet_head}+",
            f"{self.prefix}/nodes/+/functions/+",
        ]

    # -- ingest ------------------------------------------------------------------------------

    def ingest(
        self,
        topic: str,
        payload: bytes,
        *,
        now: float,
        retained: bool = False,
        wall: float | None = None,
    ) -> MessageKind:
        """Apply one message; returns what it was (``bad`` when it did not decode).

        ``wall`` (``time.time()``) lets a retained status's ``ts`` say when the node was
        last heard; without it a retained status counts as heard ``now``.
        """
        try:
            kind = self._apply(topic, payload, now, retained, wall)
        except AgentError as exc:  # BadRequest from a decoder: one bad message, skip it
            self.last_error = f"{topic}: {exc}"
            kind = "bad"
        self.counts[kind] += 1
        return kind

    def _apply(
        self, topic: str, payload: bytes, now: float, retained: bool, wall: float | None
    ) -> MessageKind:
        if topic == self.topics.fleet_index:
            self.fleet_index = protocol.decode_spec_index(payload)
            return "index"
        if topic == self.topics.node_catalog:
            self.node_index = protocol.decode_node_catalog(payload)
            return "index"
        if topic.startswith(self._fleet_head):
            fleet_fid = topic[len(self._fleet_head) :]
            if not protocol.is_valid_id(fleet_fid):
                return "unknown"
            _store(self.fleet_specs, fleet_fid, payload)
            return "fleet_spec"
        kind, node_id, fid = self.topics.classify(topic)
        if node_id is None:
            parsed = protocol.parse_node_topic(self.prefix, topic)
            if parsed is None:
                return "unknown"
            node_id, rest = parsed
            head, _, spec_fid = rest.partition("/")
            if head != "functions" or not protocol.is_valid_id(spec_fid):
                return "unknown"
            _store(self.node_specs, (node_id, spec_fid), payload)
            return "node_spec"
        if kind == "status":
            self._on_status(node_id, payload, now, retained, wall)
        elif kind == "heartbeat":
            self._on_heartbeat(node_id, payload, now)
        elif kind == "function_state" and fid is not None:
            self._on_function_state(node_id, fid, payload)
        else:
            return "unknown"
        return kind

    def _on_status(
        self, node_id: str, payload: bytes, now: float, retained: bool, wall: float | None
    ) -> None:
        if not payload:  # the retained status was cleared: the node was decommissioned
            self.records.pop(node_id, None)
            return
        msg = protocol.decode_status(payload)
        _check_node(msg, node_id, "status")
        known = node_id in self.records
        rec = self._record(node_id, now)
        interval = _positive(msg.get("heartbeat_interval_s"))
        if interval is not None and rec.heartbeat is None:
            rec.interval_s = interval
        node = rec.node
        node.name, node.location = msg["name"], msg["location"]
        node.capabilities = list(msg["capabilities"])
        node.metadata["agent_version"] = msg["agent_version"]
        node.metadata["status_ts"] = msg["ts"]
        rec.reported = msg["status"]
        if rec.reported == "offline":
            reason = msg.get("reason")
            rec.offline_reason = reason if isinstance(reason, str) else "status offline"
        else:
            rec.offline_reason = None
            refresh = _positive(msg.get("status_refresh_s"))
            if retained and refresh is not None and wall is not None:
                # Heard at its ts (not now): its Last Will may have died with a broker node.
                age = max(0.0, wall - protocol.parse_ts(msg["ts"]).timestamp())
                seen = now - age
                rec.seen_at = max(rec.seen_at, seen) if known else seen
                rec.grace_s = refresh
            else:
                rec.seen_at = now
                rec.grace_s = 0.0
        # A retained status may be old: its own ts says when; a live one is "now".
        node.last_heartbeat = _local(msg["ts"]) if retained else datetime.now()

    def _on_heartbeat(self, node_id: str, payload: bytes, now: float) -> None:
        msg = protocol.decode_heartbeat(payload)
        _check_node(msg, node_id, "heartbeat")
        rec = self._record(node_id, now)
        rec.heartbeat = msg
        if rec.reported != "offline":
            rec.seen_at = now
            rec.grace_s = 0.0
            # The heartbeat's status counts like the status message's (degraded, syncing).
            rec.reported = msg["status"]
        interval = msg.get("interval_s")
        if isinstance(interval, int | float) and not isinstance(interval, bool) and interval > 0:
            rec.interval_s = float(interval)
        node = rec.node
        node.last_heartbeat = datetime.now()
        node.metadata.update(
            system=msg["system"],
            functions=msg["functions"],
            uptime_s=msg["uptime_s"],
            seq=msg["seq"],
        )
        outbox = msg.get("outbox")
        if isinstance(outbox, dict):
            node.metadata["outbox"] = outbox

    def _on_function_state(self, node_id: str, fid: str, payload: bytes) -> None:
        states = self.states.setdefault(node_id, {})
        if not payload:
            states.pop(fid, None)
            return
        msg = protocol.decode_function_state(payload)
        if msg["function_id"] != fid:
            raise BadRequest(
                f"function state: function_id {msg['function_id']!r} does not match the topic"
            )
        states[fid] = msg

    def _record(self, node_id: str, now: float) -> NodeRecord:
        rec = self.records.get(node_id)
        if rec is None:
            rec = NodeRecord(
                node=EdgeNode(id=node_id, name=node_id),
                reported="online",
                seen_at=now,
                interval_s=self.heartbeat_interval_s,
            )
            self.records[node_id] = rec
        return rec

    # -- questions ---------------------------------------------------------------------------

    def status_of(self, rec: NodeRecord, now: float) -> EdgeNodeStatus:
        """The node's status at ``now`` (rules in the module docstring)."""
        if rec.reported == "offline":
            return EdgeNodeStatus.OFFLINE
        if now - rec.seen_at > self.misses * rec.interval_s + rec.grace_s:
            return EdgeNodeStatus.OFFLINE
        if rec.reported in ("degraded", "syncing"):
            return EdgeNodeStatus(rec.reported)
        if self._degraded(rec):
            return EdgeNodeStatus.DEGRADED
        return EdgeNodeStatus.ONLINE

    def _degraded(self, rec: NodeRecord) -> bool:
        hb = rec.heartbeat
        if hb is None:
            return False
        if any(fn.get("state") == "failed" for fn in hb["functions"]):
            return True
        outbox = hb.get("outbox")
        depth = outbox.get("messages") if isinstance(outbox, dict) else None
        return isinstance(depth, int) and depth >= self.degraded_outbox

    def refresh(self, rec: NodeRecord, now: float) -> EdgeNode:
        """Bring ``rec.node.status`` (and its offline reason) up to ``now``; the node."""
        status = self.status_of(rec, now)
        rec.node.status = status
        if status is EdgeNodeStatus.OFFLINE:
            grace = f" + {rec.grace_s:g}s status refresh" if rec.grace_s else ""
            reason = rec.offline_reason or (
                f"no heartbeat for {now - rec.seen_at:.1f}s "
                f"({self.misses} x {rec.interval_s:g}s interval{grace})"
            )
            rec.node.metadata["offline_reason"] = reason
        else:
            rec.node.metadata.pop("offline_reason", None)
        return rec.node

    def nodes(self, now: float, status: EdgeNodeStatus | None = None) -> list[EdgeNode]:
        """Every known node, refreshed, sorted by id; only those in ``status`` if given."""
        out = [self.refresh(self.records[nid], now) for nid in sorted(self.records)]
        return out if status is None else [n for n in out if n.status == status]

    def mark_heartbeat(self, node_id: str, now: float) -> None:
        """The seed's ``heartbeat(node_id)``: the node counts as heard from, ONLINE, now."""
        rec = self.records.get(node_id)
        if rec is not None:
            rec.reported = "online"
            rec.offline_reason = None
            rec.seen_at = now
            rec.grace_s = 0.0
            rec.node.last_heartbeat = datetime.now()

    def function_state(self, node_id: str, fid: str) -> dict[str, Any] | None:
        return self.states.get(node_id, {}).get(fid)

    def active_functions(self, node_id: str) -> list[str]:
        """Ids of the functions whose retained state on this node is ``active``."""
        return sorted(
            fid for fid, msg in self.states.get(node_id, {}).items() if msg["state"] == "active"
        )

    def effective_spec(self, node_id: str, fid: str) -> protocol.FunctionSpec | None:
        """The spec this node should run (its own overrides the fleet's), as retained now."""
        raw = self.node_specs.get((node_id, fid)) or self.fleet_specs.get(fid)
        if not raw:
            return None
        try:
            return protocol.decode_spec(raw, expected_id=fid)
        except AgentError:
            return None


def _store(table: dict[Any, bytes], key: Any, payload: bytes) -> None:
    if payload:
        table[key] = payload
    else:
        table.pop(key, None)


def _check_node(msg: dict[str, Any], node_id: str, what: str) -> None:
    if msg["node_id"] != node_id:
        raise BadRequest(
            f"{what}: node_id {msg['node_id']!r} does not match the topic's {node_id!r}"
        )


def _positive(value: Any) -> float | None:
    """A JSON number > 0 (not a bool) as a float, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value) if math.isfinite(value) else None
    return None


def _local(ts: str) -> datetime:
    """An RFC 3339 ``ts`` as a naive local datetime, like the seed's ``datetime.now()``."""
    return protocol.parse_ts(ts).astimezone().replace(tzinfo=None)
