"""Rollouts as data: who is targeted, who are the canaries, and what each node reported.

Owns the rules that turn the :class:`~agent.cloud.view.FleetView` into rollout results:

- a **target** is a node that is not OFFLINE and whose capabilities cover the spec's
  ``requires`` (the nodes that will deploy it now; the others skip it or get it when they
  come back, from the retained spec);
- a node's **result** for a spec is the state on its retained
  ``<p>/nodes/<node>/functions/<fid>/state`` whose ``version`` and ``sha256`` match the spec
  (``active``, ``rejected``, ``failed``), else ``offline`` when the node is OFFLINE, else
  ``pending``;
- **canaries** are chosen among ONLINE targets (not DEGRADED ones), in an order that
  depends on the function id, so successive rollouts of one function reuse the same
  canaries and different functions spread over the fleet.

Must never: do I/O or read a clock (the caller passes ``now``).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.cloud.view import FleetView
from agent.contract import protocol
from agent.models import EdgeNodeStatus

#: Results that will not change by waiting (``offline`` may, once the node is back).
FINAL = frozenset({"active", "rejected", "failed", "offline"})
FAILED = frozenset({"rejected", "failed"})


@dataclass(frozen=True)
class NodeResult:
    """One node's outcome: ``active``, ``rejected``, ``failed``, ``offline`` or ``pending``."""

    node_id: str
    state: str
    error: dict[str, Any] | None = None
    #: The version still serving there (the agent's ``active_version``), if it said.
    active_version: str | None = None


@dataclass(frozen=True)
class RolloutReport:
    """Per-node results of one spec on a set of nodes, at one moment."""

    function_id: str
    version: str
    sha256: str
    results: dict[str, NodeResult]
    elapsed_s: float = 0.0
    #: True when the deadline passed before every node had a final result.
    timed_out: bool = False

    def counts(self) -> dict[str, int]:
        """How many nodes are in each result state (every state present, zeros included)."""
        found = Counter(r.state for r in self.results.values())
        return {s: found[s] for s in ("active", "rejected", "failed", "offline", "pending")}

    @property
    def done(self) -> bool:
        return all(r.state in FINAL for r in self.results.values())

    @property
    def ok(self) -> bool:
        """Every targeted node reports the spec active."""
        return all(r.state == "active" for r in self.results.values())

    def nodes_in(self, *states: str) -> list[str]:
        return sorted(n for n, r in self.results.items() if r.state in states)

    def to_dict(self) -> dict[str, Any]:
        return {
            "function_id": self.function_id,
            "version": self.version,
            "sha256": self.sha256,
            "elapsed_s": round(self.elapsed_s, 3),
            "timed_out": self.timed_out,
            "counts": self.counts(),
            "nodes": {
                n: {"state": r.state, "error": r.error, "active_version": r.active_version}
                for n, r in sorted(self.results.items())
            },
        }


@dataclass(frozen=True)
class StagedRollout:
    """What a canary-first rollout did: canaries, then the fleet, or a rollback."""

    function_id: str
    version: str
    canaries: list[str]
    canary: RolloutReport
    #: The fleet phase; None when the canaries failed and the rollout stopped.
    fleet: RolloutReport | None = None
    rolled_back: bool = False
    #: The canaries' return to the previous spec (None when not rolled back).
    rollback: RolloutReport | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rolled_back and self.fleet is not None and self.fleet.ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "function_id": self.function_id,
            "version": self.version,
            "canaries": self.canaries,
            "canary": self.canary.to_dict(),
            "fleet": None if self.fleet is None else self.fleet.to_dict(),
            "rolled_back": self.rolled_back,
            "rollback": None if self.rollback is None else self.rollback.to_dict(),
            "notes": self.notes,
        }


def node_result(
    view: FleetView, node_id: str, fid: str, version: str, sha256: str, now: float
) -> NodeResult:
    """This node's result for the spec ``(fid, version, sha256)`` (rules in the docstring)."""
    msg = view.function_state(node_id, fid)
    if (
        msg is not None
        and msg["version"] == version
        and (msg["sha256"] or "").lower() == sha256.lower()
        and msg["state"] in ("active", "rejected", "failed")
    ):
        active = msg.get("active_version")
        return NodeResult(
            node_id, msg["state"], msg.get("error"), active if isinstance(active, str) else None
        )
    rec = view.records.get(node_id)
    if rec is None or view.status_of(rec, now) is EdgeNodeStatus.OFFLINE:
        return NodeResult(node_id, "offline")
    return NodeResult(node_id, "pending")


def report(
    view: FleetView,
    spec: protocol.FunctionSpec,
    nodes: Iterable[str],
    now: float,
    *,
    elapsed_s: float = 0.0,
    timed_out: bool = False,
) -> RolloutReport:
    results = {n: node_result(view, n, spec.id, spec.version, spec.code.sha256, now) for n in nodes}
    return RolloutReport(spec.id, spec.version, spec.code.sha256, results, elapsed_s, timed_out)


def targets(view: FleetView, spec: protocol.FunctionSpec, now: float) -> list[str]:
    """Nodes that will deploy ``spec`` from the fleet topic now: not OFFLINE, requires met."""
    return [
        node.id
        for node in view.nodes(now)
        if node.status is not EdgeNodeStatus.OFFLINE
        and protocol.requires_met(spec, node.capabilities)
    ]


def canary_count(canary: int | float | str, eligible: int) -> int:
    """How many canaries: ``3`` nodes, ``"10%"`` or ``0.1`` of ``eligible`` (at least one).

    Raises ValueError for a count < 1, a percentage outside (0, 100], or a fraction outside
    (0, 1].
    """
    if isinstance(canary, str):
        text = canary.strip()
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError(f"canary: expected a percentage in (0, 100], got {canary!r}")
            fraction = pct / 100
        else:
            return canary_count(int(text), eligible)
    elif isinstance(canary, bool):
        raise ValueError(f"canary: expected a count or a percentage, got {canary!r}")
    elif isinstance(canary, int):
        if canary < 1:
            raise ValueError(f"canary: expected a count >= 1, got {canary}")
        return min(canary, eligible)
    else:
        if not 0 < canary <= 1:
            raise ValueError(f"canary: expected a fraction in (0, 1], got {canary!r}")
        fraction = canary
    return min(eligible, max(1, math.ceil(fraction * eligible)))


def pick_canaries(
    view: FleetView, spec: protocol.FunctionSpec, now: float, count: int
) -> list[str]:
    """``count`` ONLINE targets, in a stable order keyed on the function id."""
    healthy = [
        node.id
        for node in view.nodes(now, EdgeNodeStatus.ONLINE)
        if protocol.requires_met(spec, node.capabilities)
    ]

    def order(node_id: str) -> str:
        return hashlib.sha256(f"{spec.id}/{node_id}".encode()).hexdigest()

    return sorted(sorted(healthy, key=order)[:count])
