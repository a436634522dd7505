"""A failing state store (disk full, I/O error): a state, never silence (issue 12).

Owns: whether the store fails now and why (``reason``, "degraded" in the status until a
probe writes again), the ``store_retry`` timer that probes it, what could not be stored
meanwhile (retained specs, by topic; answered invokes whose accepted record could not be
deleted) and the catch-up once it takes writes again; the outbox sweep that deletes rows
the broker acknowledged while their delete failed. A damaged file at start: opening the
store with a repair, and serving again what the damaged file still proves (salvage).

Callers carry on without the store meanwhile (a reply published directly, a spec kept in
memory); this module only records the fault and replays what it holds on recovery.

Must never: publish by itself (``announce`` is the loop's: the status, when connected), or
stop the loop over a fault.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from agent.edge.deploy_reconcile import DeploymentController
from agent.edge.outbox import OutboxPump
from agent.errors import StoreError
from agent.store import Store
from agent.store.db import store_fault
from agent.store.deployments import salvage_deployments

log = logging.getLogger(__name__)

#: How often a failing store (disk full, I/O error) is probed for writes again (monotonic).
STORE_RETRY_S = 1.0


class StoreFaults:
    """Degraded mode while the store fails; built and driven by the loop (one thread)."""

    def __init__(
        self,
        store: Store,
        *,
        outbox: OutboxPump,
        timers: dict[str, float],
        clock: Callable[[], float],
        announce: Callable[[], None],
        store_spec: Callable[[str, str, bytes], None],
        forget_accepted: Callable[[str], None],
        catch_up: Callable[[], None],
    ) -> None:
        self._store = store
        self._outbox = outbox
        #: The loop's timer table (name -> monotonic due time): ours is ``store_retry``, and
        #: ``outbox_sweep`` after a recovery.
        self._timers = timers
        self._clock = clock
        self._announce = announce  # the status again ("degraded" or not), when connected
        self._store_spec = store_spec  # a deferred spec, stored (and deployed) again
        self._forget_accepted = forget_accepted  # an uncleared accepted record, cleared
        self._catch_up = catch_up  # deploy and republish what the rows say
        #: Why the store fails (disk full, I/O error), while it does: "degraded" until a
        #: probe on the store_retry timer writes again (issue 12).
        self.reason: str | None = None
        self.since = 0.0
        #: Specs that could not be stored meanwhile, by topic (the newest wins): replayed.
        self.deferred_specs: dict[str, tuple[str, str, bytes]] = {}
        #: Answered invokes whose accepted record could not be deleted meanwhile.
        self.uncleared_accepted: set[str] = set()

    def failed(self, exc: StoreError, doing: str) -> bool:
        """Note a fault of the store (disk full, I/O error): "degraded" with the reason
        until a probe on the store_retry timer writes again. Callers then carry on without
        the store (a reply published directly, a spec kept in memory). False when ``exc``
        is no fault of the store (StateTooLarge and the other bounded refusals)."""
        kind = store_fault(exc)
        if kind is None:
            return False
        first = self.reason is None
        self.reason = f"store: {kind}: {exc}"
        if "store_retry" not in self._timers:
            self._timers["store_retry"] = self._clock() + STORE_RETRY_S
        if not first:
            log.debug("state store still failing (%s): %s", doing, exc)
            return True
        self.since = self._clock()
        log.error(
            "degraded: the state store failed while %s (%s): %s; replies go out without the "
            "outbox until it takes writes again (probed every %gs)",
            doing,
            kind,
            exc,
            STORE_RETRY_S,
        )
        self._announce()  # "degraded", with the reason
        return True

    def defer_spec(self, topic: str, kind: str, fid: str, payload: bytes) -> None:
        """A retained spec the store failed under: not sent again on this connection, so
        it is kept until the store works (the newest per topic)."""
        self.deferred_specs[topic] = (kind, fid, payload)

    def leave_uncleared(self, rid: str) -> None:
        """An answered invoke whose accepted record could not go: cleared on recovery."""
        self.uncleared_accepted.add(rid)

    def retry(self) -> None:
        """The store_retry timer: back online once the store takes a write again."""
        problem = self._store.probe()
        if problem is not None:
            self._timers["store_retry"] = self._clock() + STORE_RETRY_S
            log.debug("state store still failing: %s", problem)
            return
        self._timers.pop("store_retry", None)
        took = self._clock() - self.since
        self.reason = None
        log.warning("the state store takes writes again after %.1fs: catching up", took)
        deferred, self.deferred_specs = self.deferred_specs, {}
        for topic, (kind, fid, payload) in deferred.items():
            try:
                self._store_spec(kind, fid, payload)
            except StoreError as exc:
                self.deferred_specs[topic] = (kind, fid, payload)
                if not self.failed(exc, f"storing the spec on {topic}"):
                    raise
        uncleared, self.uncleared_accepted = self.uncleared_accepted, set()
        for rid in sorted(uncleared):  # answered: must not run again after a restart
            self._forget_accepted(rid)
        # Outcomes and states that could not be written: deploy again what the rows do not
        # say is deployed, and publish every function's state from the rows.
        self._catch_up()
        self._timers["outbox_sweep"] = self._clock()
        if self.reason is None:
            log.info("state store recovered: online")
        self._announce()
        self._outbox.drain()


def sweep_outbox(
    *,
    fault: str | None,
    outbox: OutboxPump,
    store: Store,
    timers: dict[str, float],
    done: Callable[[], object],
) -> None:
    """Delete outbox rows the broker acknowledged while their delete failed (a full disk).

    Once nothing is in flight or awaiting a retry, every row at or below the last id
    handed to MQTT was acknowledged (or refused and not moved to the dead letters):
    without this they would sit in the outbox until the next restart sent them again.
    ``fault`` is the store's fault now (none: sweep), ``done`` updates the status line; the
    time is the pump's clock (the loop's, handed to it).
    """
    if fault is not None:
        return  # the next recovery schedules the sweep again
    if outbox.in_flight or outbox.awaiting_retry or outbox.holding:
        # (a held delta is at or below last_sent_id and was never sent: wait for it)
        timers["outbox_sweep"] = outbox.clock() + 1.0
        return
    timers.pop("outbox_sweep", None)
    last = outbox.last_sent_id
    stuck = [item.id for item in store.outbox_peek(10_000) if item.id <= last]
    for item_id in stuck:
        store.outbox_ack(item_id)
    if stuck:
        log.warning(
            "deleted %d outbox messages the broker had acknowledged while the store failed",
            len(stuck),
        )
    done()


def open_store(store: Store) -> dict[str, Any] | None:
    """Open the store, repairing it (PRAGMA quick_check; a damaged file is moved aside and
    replaced by an empty one); the repair record when that happened now, else None."""
    store.open(repair=True)
    repaired = store.repaired
    if repaired is None or not store.repaired_now:
        return None
    log.error(
        "the state database was damaged (%s): moved to %s and replaced by an empty "
        "one; outbox messages lost: %s; functions come back as their retained specs "
        "arrive",
        "; ".join(repaired["problems"]),
        repaired["moved_to"],
        "unknown" if repaired["lost_outbox"] is None else repaired["lost_outbox"],
    )
    return repaired


def salvage(store: Store, deployments: DeploymentController, repaired: dict[str, Any]) -> None:
    """After a repair: serve again what the damaged file still proves (signed specs whose
    code on disk matches), until the retained specs arrive; recorded in the repair."""
    kept = deployments.salvage(salvage_deployments(repaired["moved_to"]))
    repaired["restored"] = kept
    store.set_meta("store_repaired", json.dumps(repaired, sort_keys=True))
    if kept:
        log.warning(
            "restored %d signed functions from the damaged state database: %s",
            len(kept),
            ", ".join(kept),
        )
