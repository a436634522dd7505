"""``Rollouts``: following published specs to per-node results.

Owns :meth:`Rollouts.wait_rollout` (wake on status and function-state messages, repeat a
late canary's per-node spec), canary-first :meth:`Rollouts.staged_rollout` and its rollback.
Which nodes are targets, canaries and done is decided by the pure :mod:`agent.cloud.rollout`
over the view; specs go out through :class:`~agent.cloud.publishing.SpecPublisher`.

Deadlines use ``time.monotonic``; node staleness uses the link's injectable clock.

Must never: call ``on_progress`` (user code) with the lock held, or sign a repeated spec
again (a repeat is the same bytes, so an agent takes it as a no-op).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from agent.cloud import rollout
from agent.cloud.link import ControllerLink, log
from agent.cloud.publishing import SpecPublisher
from agent.cloud.rollout import RolloutReport, StagedRollout
from agent.contract import protocol
from agent.errors import DeploymentRejected

Progress = Callable[[str, RolloutReport], None]

#: A canary without a result after this long gets its per-node spec again (then after
#: twice that, and so on): see :meth:`Rollouts.wait_rollout`.
REPUSH_S = 10.0


class Rollouts:
    """Rollout waits and staged rollouts over the shared link and the spec publisher."""

    def __init__(self, link: ControllerLink, specs: SpecPublisher) -> None:
        self._link = link
        self._specs = specs

    def wait_rollout(
        self,
        spec: protocol.FunctionSpec,
        nodes: Iterable[str] | None = None,
        timeout: float = 60.0,
        on_progress: Progress | None = None,
        *,
        phase: str = "rollout",
        repush: Callable[[list[str]], object] | None = None,
    ) -> RolloutReport:
        """Wait until every node in ``nodes`` (default: the targets now) has a final result
        for ``spec`` (active, rejected, failed, offline), or the deadline; the report says
        which (``timed_out`` and ``pending`` nodes when the deadline won).

        ``offline`` is final at once only for a node this controller has never heard of.
        A known node that is offline is waited for until the deadline: it may be behind a
        broker failover (a NATS node's death cost its clients up to 20 s in CI, more than
        three heartbeats of 5 s), and it takes the retained spec when it is back. (The
        targets of ``deploy_to_all`` and of a staged rollout leave out nodes already
        offline when they are chosen.)

        ``repush(nodes)`` is called with the nodes still ``pending`` (online, no result)
        :data:`REPUSH_S` after the start, then after twice that, and so on: it publishes their
        per-node spec again. A clustered broker may acknowledge a retained publish and still
        lose its live delivery to a subscriber (NATS while its streams elect leaders); the
        agent takes the same bytes again as a no-op (a staged rollout repeats exactly
        what it published, signature included), so a repeat only fills the gap.
        """
        link = self._link
        node_ids = self._specs.targets(spec) if nodes is None else list(dict.fromkeys(nodes))
        started = time.monotonic()
        deadline = started + timeout
        repush_wait = REPUSH_S
        repush_at = started + repush_wait
        with link.cond:  # offline is final at once only for nodes the controller never saw
            reachable = {n for n in node_ids if n in link.view.records}
        changed = threading.Event()
        last: dict[str, rollout.NodeResult] | None = None
        with link.cond:
            link.watchers.add(changed)
        try:
            while True:
                changed.clear()
                with link.cond:
                    current = rollout.report(
                        link.view,
                        spec,
                        node_ids,
                        link.clock(),
                        elapsed_s=time.monotonic() - started,
                    )
                settled = all(
                    r.state in rollout.FINAL and not (r.state == "offline" and n in reachable)
                    for n, r in current.results.items()
                )
                finished = settled or time.monotonic() >= deadline
                if on_progress is not None and (finished or current.results != last):
                    on_progress(phase, current)
                last = current.results
                if finished:
                    return replace(current, timed_out=not settled)
                if repush is not None and time.monotonic() >= repush_at:
                    pending = sorted(n for n, r in current.results.items() if r.state == "pending")
                    if pending:
                        log.info(
                            "%s %s: no result from %d node(s) after %.0fs: publishing their "
                            "spec again (%s)",
                            spec.id,
                            spec.version,
                            len(pending),
                            time.monotonic() - started,
                            ", ".join(pending[:10]),
                        )
                        link.stats["specs_repushed"] += len(pending)
                        repush(pending)
                    repush_wait *= 2
                    repush_at = time.monotonic() + repush_wait
                # Woken by status/state messages; every 0.25 s anyway (staleness advances).
                changed.wait(min(0.25, max(0.0, deadline - time.monotonic())))
        finally:
            with link.cond:
                link.watchers.discard(changed)

    def staged_rollout(
        self,
        spec: protocol.FunctionSpec,
        *,
        canary: int | float | str = "10%",
        max_failures: int = 0,
        canary_timeout_s: float = 60.0,
        timeout_s: float = 120.0,
        on_progress: Progress | None = None,
    ) -> StagedRollout:
        """Canaries first (per-node specs), then the fleet; roll the canaries back when more
        than ``max_failures`` of them do not report the spec active in time."""
        link, specs = self._link, self._specs
        fid = spec.id
        with link.cond:
            now = link.clock()
            eligible = rollout.targets(link.view, spec, now)
            count = rollout.canary_count(canary, len(eligible)) if eligible else 0
            canaries = rollout.pick_canaries(link.view, spec, now, count)
            previous = {n: link.view.node_specs.get((n, fid)) for n in canaries}
            previous_fleet = link.view.fleet_specs.get(fid)
        if not canaries:
            raise DeploymentRejected(
                f"{fid}: no ONLINE node satisfies requires {spec.requires}: nothing to canary"
            )
        specs.deploy_nodes(spec, canaries)
        canary_report = self.wait_rollout(
            spec,
            canaries,
            canary_timeout_s,
            on_progress,
            phase="canary",
            repush=lambda pending: specs.republish_node_specs(fid, pending),
        )
        failed = [n for n, r in canary_report.results.items() if r.state != "active"]
        if len(failed) > max_failures:
            log.warning("%s %s: %d canaries failed; rolling back", fid, spec.version, len(failed))
            rollback = self._roll_back(fid, previous, previous_fleet, canary_timeout_s, on_progress)
            notes = [
                f"{len(failed)} of {len(canaries)} canaries did not become active: "
                + ", ".join(f"{n} ({canary_report.results[n].state})" for n in failed)
            ]
            return StagedRollout(
                fid, spec.version, canaries, canary_report, None, True, rollback, notes
            )
        fleet_targets = sorted(set(specs.targets(spec)) | set(canaries))
        specs.publish_spec(spec)  # first the fleet spec, then the canaries follow it
        for node_id in canaries:
            specs.clear_spec(fid, node_id)
        fleet_report = self.wait_rollout(spec, fleet_targets, timeout_s, on_progress, phase="fleet")
        return StagedRollout(fid, spec.version, canaries, canary_report, fleet_report)

    def _roll_back(
        self,
        fid: str,
        previous: dict[str, bytes | None],
        previous_fleet: bytes | None,
        timeout: float,
        on_progress: Progress | None,
    ) -> RolloutReport | None:
        """Give each canary back what it had: its own previous spec, or the fleet's."""
        specs = self._specs
        groups: dict[bytes, list[str]] = {}
        for node_id, own in previous.items():
            if own is not None and specs.signer is not None:
                # The old code again, under a new sequence: the node refuses a replay.
                old = protocol.decode_spec(own, expected_id=fid)
                specs.publish_spec(replace(old, signature=None, sequence=None), node_id)
            elif own is not None:
                self._link.publish(specs.spec_topic(fid, node_id), own, retain=True)
            else:
                specs.clear_spec(fid, node_id)  # falls back to the fleet spec, or removes it
            restored = own or previous_fleet
            if restored is not None:
                groups.setdefault(restored, []).append(node_id)
        merged: RolloutReport | None = None
        for raw, nodes in groups.items():
            spec = protocol.decode_spec(raw, expected_id=fid)
            part = self.wait_rollout(spec, nodes, timeout, on_progress, phase="rollback")
            merged = (
                part
                if merged is None
                else replace(
                    merged,
                    results={**merged.results, **part.results},
                    timed_out=merged.timed_out or part.timed_out,
                )
            )
        return merged
