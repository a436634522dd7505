"""Deployments as the loop sees them: retained specs in, function states out.

Owns: the size check of a spec before a byte of it is parsed (``agent.max_spec_bytes``),
handing specs to the :class:`~agent.edge.deploy_reconcile.DeploymentController`; the retained
spec indexes (exact-topic subscriptions for brokers without retained wildcards,
:mod:`agent.contract.specindex`) and roll calls (answered once within their window, at a
bounded rate); each function's retained state, queued in the outbox (the newest per
function supersedes the older), or published directly while the store fails.

Must never: install or load code (``agent.edge.deploy_prepare`` does, off the loop), or
acknowledge incoming messages (the loop does).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from agent.config import Config
from agent.contract import protocol
from agent.contract.specindex import AnswerBudget, IndexFollower, rollcall_delay
from agent.edge.deploy_reconcile import DeploymentController
from agent.edge.outbox import OutboxPump
from agent.edge.store_faults import StoreFaults
from agent.edge.uplink import Uplink
from agent.errors import BadRequest, DeploymentRejected, StoreError, error_to_dict
from agent.exec.pool import WorkerPool
from agent.store import OutboxFull, Store

log = logging.getLogger(__name__)


class SpecIntake:
    """Specs, spec indexes, roll calls and function states; driven by the loop."""

    def __init__(
        self,
        settings: Callable[[], Config],
        *,
        topics: protocol.Topics,
        store: Store,
        pool: WorkerPool,
        deployments: DeploymentController,
        outbox: OutboxPump,
        uplink: Uplink,
        faults: StoreFaults,
        spec_index: IndexFollower | None,
        timers: dict[str, float],
        clock: Callable[[], float],
    ) -> None:
        self._settings = settings  # the running config (a reload replaces it)
        self._topics = topics
        self._store = store
        self._pool = pool
        self._deployments = deployments
        self._outbox = outbox
        self._uplink = uplink
        self._faults = faults
        self._spec_index = spec_index
        #: The loop's timer table (name -> monotonic due time): ours is ``rollcall``.
        self._timers = timers
        self._clock = clock
        self._rollcall_budget = AnswerBudget()  # a flood of roll calls: a bounded rate

    # -- specs ----------------------------------------------------------------------------

    def on_spec(self, kind: str, fid: str, payload: bytes) -> bool:
        """A retained spec (fleet or node scope): checked for size, then reconciled; False
        when it was rejected for its size."""
        scope = "fleet" if kind == "fleet_spec" else "node"
        if self._spec_too_big(fid, payload):
            return False  # acknowledged by the caller; never parsed
        self._deployments.on_spec(scope, fid, payload)
        return True

    def _spec_too_big(self, fid: str, payload: bytes) -> bool:
        """Over ``agent.max_spec_bytes``: reported rejected without parsing a byte of it."""
        limit = self._settings().agent.max_spec_bytes
        if len(payload) <= limit:
            return False
        error = DeploymentRejected(
            f'function spec "{fid}" is {len(payload)} bytes, over agent.max_spec_bytes '
            f"({limit}); send big code by reference (code {{url, sha256, size}})"
        )
        log.warning("rejected spec for %s: %s", fid, error, extra={"function_id": fid})
        row = self._store.get_deployment(fid)
        active = row.active_version if row is not None else None
        self.report_state(fid, None, None, "rejected", error_to_dict(error), active)
        return True

    def on_index_or_rollcall(self, kind: str, payload: bytes) -> None:
        """A retained spec index (subscribe to the exact spec topics it lists, for brokers
        without retained wildcards) or a roll call (answer within its window)."""
        try:
            if kind == "rollcall":  # one answer covers every call pending, within budget
                due = self._rollcall_budget.due(self._clock(), rollcall_delay(payload))
                self._timers["rollcall"] = min(self._timers.get("rollcall", due), due)
                return
            client = self._uplink.client
            if self._spec_index is None or client is None:
                return
            scope = "fleet" if kind == "fleet_index" else "node"
            change = self._spec_index.on_index(scope, payload)
        except BadRequest as exc:
            log.warning("ignoring bad %s: %s", kind.replace("_", " "), exc)
            return
        if change.subscribe:
            log.info("spec index: subscribing to %s", ", ".join(change.subscribe))
            client.subscribe(change.subscribe)
        if change.unsubscribe:
            log.info("spec index: unsubscribing from %s", ", ".join(change.unsubscribe))
            client.unsubscribe(change.unsubscribe)

    def rollcall_answered(self, now: float) -> None:
        """The rollcall timer fired: the answer spends from the budget."""
        del self._timers["rollcall"]
        self._rollcall_budget.spend(now)

    # -- function states ------------------------------------------------------------------

    def report_state(
        self,
        fid: str,
        version: str | None,
        sha256: str | None,
        state: str,
        error: dict[str, str] | None,
        active_version: str | None,
    ) -> None:
        """Queue the function's retained state (the controller's ``report``)."""
        payload = protocol.encode_function_state(
            fid,
            version,
            sha256,
            state,
            error,
            # how memory_mb is enforced: per process (rlimit) or also for its whole tree
            extra={"active_version": active_version, "limits": self._pool.limits_mode(fid)},
        )
        self._enqueue(
            self._topics.function_state(fid),
            payload,
            retain=True,
            kind="state",
            key=f"state:{fid}",
        )

    def _enqueue(self, topic: str, payload: bytes, *, retain: bool, kind: str, key: str) -> None:
        try:
            self._store.outbox_put(topic, payload, qos=1, retain=retain, kind=kind, key=key)
        except OutboxFull as exc:
            log.error("outbox full, %s message for %s not queued: %s", kind, topic, exc)
            return
        except StoreError as exc:
            if not self._faults.failed(exc, f"queueing the {kind} message for {topic}"):
                raise
            # Sent without the outbox; the store's rows are published again on recovery.
            if self._uplink.live:
                self._uplink.publish(topic, payload, qos=1, retain=retain)
            return
        self._outbox.drain()

    def republish_states(self) -> int:
        """Queue every function's retained state again, from the store's deployment rows
        (a new broker session, or a store that could not queue them); how many."""
        rows = self._store.list_deployments()
        for row in rows:
            error = json.loads(row.error_json) if row.error_json else None
            self.report_state(
                row.function_id, row.version, row.sha256, row.state, error, row.active_version
            )
        return len(rows)
