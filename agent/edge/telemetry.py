"""What the node says about itself: the retained status, heartbeats, the systemd status line,
and the dead-letter count that makes it "degraded".

Owns: the status payload (online / degraded / offline, with the reasons), the heartbeat
payload and its sequence number, the uptime clock, the dead letters as last read from the
store (re-read on a timer: ``edge-agent status`` may clear or retry them).

Heartbeats and the status are published directly, never queued in the outbox: they are
worth nothing late.

Must never: queue messages in the outbox, or wait on the loop's events (the loop waits for
the offline status's PUBACK at shutdown, with the mid :meth:`Telemetry.publish_status`
returns).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent import __version__
from agent.config import Config
from agent.contract import protocol
from agent.edge.deploy_reconcile import DeploymentController
from agent.edge.isolation import FunctionIdentities
from agent.edge.outbox import OutboxPump
from agent.edge.statesync import StateSync
from agent.edge.store_faults import StoreFaults
from agent.edge.systemd import Notifier
from agent.edge.uplink import Uplink
from agent.errors import StoreError
from agent.exec.metrics import EdgeMetrics, system_metrics
from agent.exec.pool import WorkerPool
from agent.store import Store

log = logging.getLogger(__name__)

#: The retained status is republished (fresh ``ts``) every this many heartbeats, so a view
#: that sees only retained messages can tell a node whose Last Will was lost (its broker
#: node died with it) from a live one; docs/scaling.md weighs the broker load.
STATUS_REFRESH_HEARTBEATS = 3


class Telemetry:
    """Status, heartbeats and the status line; built and driven by the loop (one thread)."""

    def __init__(
        self,
        settings: Callable[[], Config],
        *,
        topics: protocol.Topics,
        uplink: Uplink,
        store: Store,
        pool: WorkerPool,
        metrics: EdgeMetrics,
        notifier: Notifier,
        sync: StateSync,
        deployments: DeploymentController,
        identities: FunctionIdentities,
        outbox: OutboxPump,
        faults: StoreFaults,
        inflight: Callable[[], int],
        clock: Callable[[], float],
    ) -> None:
        self._settings = settings  # the running config (a reload replaces it)
        self._topics = topics
        self._uplink = uplink
        self._store = store
        self._pool = pool
        self._metrics = metrics
        self._notifier = notifier
        self._sync = sync
        self._deployments = deployments
        self._identities = identities
        self._outbox = outbox
        self._faults = faults
        self._inflight = inflight  # invocations accepted and not yet answered
        self._clock = clock
        self._started = clock()
        self.heartbeat_seq = 0
        self.dead_letters: int | None = None  # read from the store when first needed

    # -- degraded -------------------------------------------------------------------------

    def refresh_dead_letters(self) -> None:
        """Re-read the dead letters (the CLI may clear or retry them); announce a change."""
        count, marked = self._store.dead_letter_counts()
        if marked and self._store.dead_letters_requeue():
            log.info("dead letters put back in the outbox at the operator's request")
            count, _ = self._store.dead_letter_counts()
            self._outbox.drain()
        if count == self.dead_letters:
            return
        was, self.dead_letters = self.dead_letters, count
        if was is None and not count:
            return  # the first look, at start: nothing to announce
        if count and not was:
            log.warning("degraded: %d dead letters (edge-agent status lists them)", count)
        elif not count:
            log.info("no dead letters left: online again")
        if self._uplink.live:
            self.publish_status("online")  # becomes "degraded" while dead letters remain

    def _degraded(self) -> list[str]:
        """Why this node is degraded (the status's "degraded" list); empty when it is not."""
        if self.dead_letters is None:
            self.dead_letters = self._store.dead_letter_counts()[0]
        if not self.dead_letters:
            return []
        newest = self._store.dead_letters(1)
        about = f" (newest: {newest[0].topic}: {newest[0].reason})" if newest else ""
        return [f"dead_letters: {self.dead_letters} messages the broker refused for good{about}"]

    def degraded_reasons(self) -> list[str]:
        """Every reason this node is degraded: the store's fault first, then the others."""
        reasons = [self._faults.reason] if self._faults.reason else []
        try:
            others = self._degraded()
        except StoreError:  # dead letters cannot be counted while the store fails
            others = []
        return reasons + others

    # -- publishing -----------------------------------------------------------------------

    def publish_status(self, status: str) -> int:
        """Publish the retained status (QoS 1; "online" becomes "degraded" with a reason);
        its MQTT message id."""
        config = self._settings()
        node = config.node
        degraded = self.degraded_reasons()
        if status == "online" and degraded:
            status = "degraded"
        payload = protocol.encode_status(
            node.id,
            status,
            agent_version=__version__,
            name=node.name,
            location=node.location,
            capabilities=node.capabilities,
            extra={
                "functions": len(self._pool.functions()),
                "sync": self._sync.summary(),
                "trust": self._deployments.trust_mode,  # "unsigned" is visible from the cloud
                "isolation": self._identities.isolation.mode,  # "shared-uid" too
                "dead_letters": self.dead_letters or 0,
                **({"degraded": degraded} if degraded else {}),
                **({"store_repaired": self._store.repaired} if self._store.repaired else {}),
                # A view that reads only this retained message (edgectl nodes) judges
                # staleness from ts: republished every status_refresh_s (docs/scaling.md).
                "heartbeat_interval_s": config.agent.heartbeat_interval_s,
                "status_refresh_s": config.agent.heartbeat_interval_s * STATUS_REFRESH_HEARTBEATS,
            },
        )
        return self._uplink.publish(self._topics.status, payload, qos=1, retain=True)

    def heartbeat(self) -> None:
        """The heartbeat timer: a heartbeat, and every few a fresh retained status."""
        self._send_heartbeat()
        if self._uplink.connected and self.heartbeat_seq % STATUS_REFRESH_HEARTBEATS == 0:
            self.publish_status("online")  # a fresh ts: "last seen" for one-shot views

    def _send_heartbeat(self) -> None:
        if not self._uplink.live:
            return
        config = self._settings()
        self.heartbeat_seq += 1
        functions = []
        try:
            rows = self._store.list_deployments()
        except StoreError as exc:  # heartbeats go on (degraded) while the store cannot be read
            if not self._faults.failed(exc, "reading deployments for a heartbeat"):
                raise
            rows = []
        for row in rows:
            stats = self._metrics.function_stats(row.function_id)
            functions.append(
                {
                    "id": row.function_id,
                    "version": row.active_version or row.version,
                    "state": row.state,
                    "invocations": stats["invocations"],
                    "errors": stats["errors"],
                    "timeouts": stats["timeouts"],
                    "p50_ms": round(stats["p50_ms"], 3),
                    "p95_ms": round(stats["p95_ms"], 3),
                    "limits": self._pool.limits_mode(row.function_id),
                }
            )
        count, nbytes = self._store.outbox_depth()
        degraded = self.degraded_reasons()
        payload = protocol.encode_heartbeat(
            config.node.id,
            self.heartbeat_seq,
            round(self._clock() - self._started, 3),
            "degraded" if degraded else "online",
            system_metrics(config.agent.state_dir),
            functions,
            extra={
                "outbox": {"messages": count, "bytes": nbytes},
                "dead_letters": self.dead_letters or 0,
                **({"degraded": degraded} if degraded else {}),
                "inflight": self._inflight(),
                "sync": self._sync.summary(),
                "trust": self._deployments.trust_mode,
                "isolation": self._identities.isolation.mode,
                # Lets a controller judge staleness without knowing this node's config.
                "interval_s": config.agent.heartbeat_interval_s,
            },
        )
        self._uplink.publish(self._topics.heartbeat, payload, qos=0)

    def update_status_line(self) -> None:
        """The systemd status line (``systemctl status``)."""
        count, _ = self._store.outbox_depth()
        self._notifier.status(
            f"{'connected' if self._uplink.connected else 'disconnected'}, "
            f"{len(self._pool.functions())} functions, outbox {count}"
        )
