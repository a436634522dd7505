"""``SpecPublisher``: the controller's writes to the fleet's retained topics.

Owns publishing function specs (fleet-wide or per node, signed for their target with a new
sequence when the controller has a signer), clearing them, the retained spec indexes a
broker without retained wildcards needs (agent.contract.specindex), and forgetting a
decommissioned node. It remembers the index payloads it published until the broker echoes
them (:meth:`SpecPublisher.own_echo`), so the view never goes back to an older index.

Must never: wait for a rollout (``deploy`` does), or hold the lock while publishing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from agent.cloud import rollout
from agent.cloud.link import ControllerLink
from agent.contract import protocol
from agent.trust import Signer


class SpecPublisher:
    """Specs, their indexes and node removal, published through the shared link."""

    def __init__(
        self, link: ControllerLink, *, signer: Signer | None, retained_wildcards: str
    ) -> None:
        self._link = link
        #: Signs every spec published (deploys, canaries, rollbacks).
        self.signer = signer
        self.retained_wildcards = retained_wildcards
        self._last_sequence = 0
        #: Index topic -> the payload this controller published last, until it comes back.
        self._index_sent: dict[str, bytes] = {}

    def own_echo(self, topic: str, payload: bytes) -> bool:
        """True (lock held) for a message on an index topic this controller wrote and has
        not seen come back yet: its own write is newer, so the view ignores the message."""
        if topic not in self._index_sent:
            return False
        if self._index_sent[topic] == payload:
            del self._index_sent[topic]
        return True

    def targets(self, spec: protocol.FunctionSpec) -> list[str]:
        """Nodes that would deploy ``spec`` from the fleet topic now (not offline, requires)."""
        link = self._link
        with link.cond:
            return rollout.targets(link.view, spec, link.clock())

    def spec_topic(self, function_id: str, node_id: str | None = None) -> str:
        topics = self._link.view.topics
        if node_id is None:
            return topics.fleet_function(function_id)
        return topics.node(node_id).node_function(function_id)

    def publish_spec(self, spec: protocol.FunctionSpec, node_id: str | None = None) -> None:
        """Publish ``spec`` retained, fleet-wide (``node_id`` None) or for one node; signed
        for that target with a new sequence when the controller has a signer. Then the
        spec index (see :meth:`update_indexes`)."""
        self.publish_spec_only(spec, node_id)
        self.update_indexes([(node_id, spec.id, spec.version)])

    def publish_spec_only(self, spec: protocol.FunctionSpec, node_id: str | None) -> None:
        """:meth:`publish_spec` without the index update (callers batch it)."""
        if self.signer is not None:
            target = protocol.FLEET_TARGET if node_id is None else node_id
            spec = self.signer.sign(spec, target=target, sequence=self.next_sequence(spec))
        self._link.publish(
            self.spec_topic(spec.id, node_id), protocol.encode_spec(spec), retain=True
        )

    def republish_node_specs(self, function_id: str, node_ids: Iterable[str]) -> None:
        """Publish again, byte for byte, each node's retained per-node spec as the view holds
        it: the same signature and sequence, so an agent that got it takes it as the no-op a
        retained replay is (signing again would make a new spec and restart a deploy in
        progress)."""
        link = self._link
        for node_id in node_ids:
            with link.cond:
                payload = link.view.node_specs.get((node_id, function_id))
            if payload:
                link.publish(self.spec_topic(function_id, node_id), payload, retain=True)

    def next_sequence(self, spec: protocol.FunctionSpec) -> int:
        """A sequence above every one this controller used and every retained spec of the
        function shows: the wall clock in milliseconds, or one more than the highest seen.

        The clock needs no coordination between controllers and keeps going up after a
        function was removed (its retained specs gone, the nodes' last sequence kept); the
        retained floor covers a controller whose clock is behind the last publisher's.
        An explicit ``spec.sequence`` above both wins (``edgectl deploy --sequence``).
        """
        view = self._link.view
        with self._link.cond:
            retained = [view.fleet_specs.get(spec.id)]
            retained += [raw for (_, fid), raw in view.node_specs.items() if fid == spec.id]
        seen = [_sequence_of(raw) for raw in retained if raw]
        floor = max([self._last_sequence, *seen]) + 1
        sequence = max(floor, int(time.time() * 1000), spec.sequence or 0)
        self._last_sequence = sequence
        return sequence

    def clear_spec(self, function_id: str, node_id: str | None = None) -> bool:
        """Clear the retained spec (nodes remove the function, or fall back to the fleet
        spec); True when there was one."""
        view = self._link.view
        with self._link.cond:
            if node_id is None:
                had = function_id in view.fleet_specs
            else:
                had = (node_id, function_id) in view.node_specs
        self._link.publish(self.spec_topic(function_id, node_id), b"", retain=True)
        self.update_indexes([(node_id, function_id, None)])
        return had

    def update_indexes(self, changes: Iterable[tuple[str | None, str, str | None]]) -> None:
        """Bring the retained spec indexes up to date after specs were published, each
        ``(node id or None for the fleet, function id, version or None when cleared)``.

        Agents on a broker without retained wildcards subscribe to the exact spec topics the
        indexes list (agent.contract.specindex). Read-modify-write of the retained copy this
        controller holds, published after the specs: one controller writing at a time is
        assumed (two at once may lose one's update; an agent never undeploys because of
        an index). Nothing is written with ``retained_wildcards="yes"``.
        """
        if self.retained_wildcards == "yes":
            return
        view = self._link.view
        topics = view.topics
        out: list[tuple[str, bytes]] = []
        with self._link.cond:
            fleet = dict(view.fleet_index)
            nodes = {n: dict(fns) for n, fns in view.node_index.items()}
            fleet_changed, nodes_changed = False, set()
            for node_id, fid, version in changes:
                table = fleet if node_id is None else nodes.setdefault(node_id, {})
                if table.get(fid) == version:
                    continue
                if version is None:
                    table.pop(fid, None)
                else:
                    table[fid] = version
                if node_id is None:
                    fleet_changed = True
                else:
                    nodes_changed.add(node_id)
            nodes = {n: fns for n, fns in nodes.items() if fns}
            if fleet_changed:
                out.append((topics.fleet_index, protocol.encode_spec_index(fleet)))
            for node_id in sorted(nodes_changed):
                own = nodes.get(node_id)
                out.append((topics.node(node_id).node_index, protocol.encode_spec_index(own or {})))
            if nodes_changed:
                out.append((topics.node_catalog, protocol.encode_node_catalog(nodes)))
            view.fleet_index, view.node_index = fleet, nodes
            watched = (topics.fleet_index, topics.node_catalog)  # node indexes never come back
            self._index_sent.update((t, p) for t, p in out if t in watched)
        for topic, payload in out:
            self._link.publish(topic, payload, retain=True)

    def deploy_fleet(self, spec: protocol.FunctionSpec) -> list[str]:
        """Publish the fleet spec; the nodes that will deploy it now (the rollout's targets)."""
        targets = self.targets(spec)
        self.publish_spec(spec)
        return targets

    def deploy_nodes(self, spec: protocol.FunctionSpec, node_ids: Iterable[str]) -> list[str]:
        """Publish a per-node spec to each node; the nodes."""
        nodes = list(dict.fromkeys(node_ids))
        for node_id in nodes:
            self.publish_spec_only(spec, node_id)
        self.update_indexes([(node_id, spec.id, spec.version) for node_id in nodes])
        return nodes

    def forget_node(self, node_id: str) -> bool:
        """Clear a decommissioned node's retained status and function states."""
        view = self._link.view
        with self._link.cond:
            known = node_id in view.records
            fids = list(view.states.get(node_id, {}))
        topics = view.topics.node(node_id)
        for fid in fids:
            self._link.publish(topics.function_state(fid), b"", retain=True)
        self._link.publish(topics.status, b"", retain=True)
        with self._link.cond:
            view.records.pop(node_id, None)
            view.states.pop(node_id, None)
        return known


def _sequence_of(raw: bytes) -> int:
    """The ``sequence`` of a retained spec, 0 when it has none or does not parse."""
    try:
        value = json.loads(raw).get("sequence")
    except (ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
