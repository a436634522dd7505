"""``Agent``: the gateway daemon's event loop. One thread owns all mutable state.

Everything else only enqueues: paho's network thread (:mod:`agent.mqtt` events), signal
handlers, invocation threads (results) and the deployer thread (outcomes). The loop
dispatches each event to a ``handle_<event>`` method and runs its timers (heartbeat,
watchdog, dedupe pruning) on the monotonic clock it is given (``clock``: a test hands in a
fake one; wall-clock timestamps in messages stay wall-clock). Each wake-up takes every event
queued since the last one (up to ``BATCH_MAX``), in order: a run of finished invocations is
answered with one transaction (group commit), a run of PUBACKs deleted with one, and the
MQTT client wakes its network thread once for the batch (``Transport.corked``).

The Agent is the composition root of the loop: it owns the events, the dispatch, the timer
table and the lifecycle (boot, run, shutdown, reload), and builds the collaborators that do
the work, each given only what it needs:

- :mod:`agent.edge.invocations`: admitting, dispatching and answering invocations, and the
  recovery of accepted invokes; :mod:`agent.edge.replies`: reply payloads and where they go.
- :mod:`agent.edge.spec_intake`: retained specs, spec indexes, roll calls, function states.
- :mod:`agent.edge.telemetry`: the retained status, heartbeats, the systemd status line.
- :mod:`agent.edge.store_faults`: degraded mode while the store fails, and its recovery.
- :mod:`agent.edge.uplink`: the MQTT client (``agent.mqtt``, assigned by ``cli.build_agent``)
  and whether it is connected.

Delivery guarantees:
- An incoming QoS 1 message is acknowledged to the broker only once the loop has handled it
  durably (a spec stored, a reply in the outbox), so a crash before that means redelivery.
- What the agent owes the cloud (replies, function states, sync deltas and snapshots) is
  written to the SQLite outbox before it is published and deleted on the broker's PUBACK;
  it drains in order after every reconnect and after a restart. Heartbeats and the online
  status are not queued.
- Outbox full: new invocations are answered ``overloaded`` (published directly, not queued)
  until it drains; a reply that finds the outbox full is published directly when connected
  and otherwise logged as lost with its request id: the only loss path, and a loud one.

Must never: block on a worker, the network or a deployment (threads do that and post).

Re-exports :data:`STATUS_REFRESH_HEARTBEATS` (now in :mod:`agent.edge.telemetry`) for
``scripts/fleet_sim.py``, which imports it from here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import select
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.contract import protocol
from agent.contract.specindex import IndexFollower
from agent.edge.deploy_prepare import Deployer, DeployOutcome
from agent.edge.deploy_reconcile import DeploymentController
from agent.edge.invocations import RECORD_TIMER, Invocation, Invocations, InvokeDone
from agent.edge.isolation import FunctionIdentities
from agent.edge.outbox import OutboxPump
from agent.edge.reload import read_reload
from agent.edge.replies import Replies
from agent.edge.spec_intake import SpecIntake
from agent.edge.statesync import StateSync
from agent.edge.store_faults import StoreFaults, open_store, salvage, sweep_outbox
from agent.edge.systemd import Notifier, set_level
from agent.edge.telemetry import STATUS_REFRESH_HEARTBEATS, Telemetry
from agent.edge.uplink import Transport, Uplink
from agent.errors import AgentError, StoreError
from agent.exec.metrics import EdgeMetrics
from agent.exec.pool import WorkerPool
from agent.mqtt import Connected, ConnectFailed, Disconnected, Message, Published
from agent.store import Store
from agent.store.accepted import AcceptedInvokes
from agent.trust import TrustPolicy

__all__ = ["STATUS_REFRESH_HEARTBEATS", "Agent"]

log = logging.getLogger(__name__)

#: Events taken from the queue per wake-up at most. A run of finished invocations among them
#: is answered with one transaction (group commit), a run of PUBACKs deleted with one.
BATCH_MAX = 256
#: Seconds a delivered outbox item's row may wait for the next group commit of replies to
#: delete it (no transaction of its own under load); then the loop deletes it on its own.
#: A crash meanwhile sends it again after the restart: at least once, as any reply.
ACK_LINGER_S = 0.1
#: Group commit under load (:meth:`Agent._gather_answers`, ``agent.commit_delay_ms``): this
#: many answers are enough to commit without waiting out the delay.
COMMIT_GROUP = 16


@dataclass(frozen=True)
class _Signal:
    signum: int


class Agent:
    """The daemon. ``agent.edge.cli.build_agent`` builds one; ``run()`` blocks until stopped."""

    def __init__(
        self,
        config: Config,
        *,
        store: Store,
        pool: WorkerPool,
        notifier: Notifier,
        config_path: str | None = None,
        metrics: EdgeMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        executor: Executor | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.store = store
        self.pool = pool
        self.notifier = notifier
        #: Every monotonic read of the loop and its collaborators (timers, deadlines, ages).
        self._clock = clock
        # Heartbeats read counters and percentiles only: no per-invocation record log.
        self.metrics = metrics or EdgeMetrics(history=0)
        self.topics = protocol.Topics(config.mqtt.topic_prefix, config.node.id)
        #: Exact-topic spec subscriptions from the retained indexes (agent.contract.specindex).
        mode = config.mqtt.retained_wildcards
        self.spec_index = IndexFollower(self.topics, mode) if mode != "yes" else None
        self.uplink = Uplink()
        functions_dir = Path(config.agent.state_dir) / "functions"
        #: Each function's own uid and gid (runtime.function_uids), decided at boot.
        self.identities = FunctionIdentities(store, config.runtime.function_uids, functions_dir)
        self.deployer = Deployer(
            functions_dir, pool, config.runtime, self.post, identities=self.identities
        )
        self.deployments = DeploymentController(
            store,
            pool,
            self.deployer,
            config.node.capabilities,
            self._report_state,
            forget=self.metrics.forget,
            # Reads and checks [trust] keys: a ConfigError here is exit 78.
            trust=TrustPolicy.from_config(config),
        )
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: What the loop waits on (from its first wait): an eventfd that wakes it, and the fds
        #: of the workers it sent invocations to itself. ``post`` writes the eventfd only
        #: while the loop waits there (``_waiting``): a busy loop costs posters no syscall.
        self._poller = select.poll()
        self._wake: int | None = None
        self._waiting = False
        threads = config.runtime.max_workers * 2
        self._executor = executor or ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="edge-invoke"
        )
        #: Accepted invokes still running after record_accepted_after_s, recorded durably
        #: (and acknowledged then) until answered.
        self.accepted = AcceptedInvokes(store)
        self.outbox = OutboxPump(
            store,
            self.uplink.publish_item,
            delta_linger_s=config.outbox.delta_linger_ms / 1000.0,
            ack_linger_s=ACK_LINGER_S,
            clock=clock,
        )
        self.sync = StateSync(
            store,
            self.topics,
            self.outbox,
            Path(config.agent.state_dir) / "sync.hwm",
            max_payload=config.agent.max_payload_bytes,
        )
        self._stopping = False
        #: Timer name -> when it is due (``clock``); collaborators set their own entries.
        self._timers: dict[str, float] = {}
        self.faults = StoreFaults(
            store,
            outbox=self.outbox,
            timers=self._timers,
            clock=clock,
            announce=self._announce_status,
            store_spec=self._store_spec,
            forget_accepted=self._forget_accepted,
            catch_up=self._catch_up,
        )
        self.replies = Replies(
            self._settings, store=store, outbox=self.outbox, uplink=self.uplink, faults=self.faults
        )
        self.invocations = Invocations(
            self._settings,
            topics=self.topics,
            store=store,
            pool=pool,
            sync=self.sync,
            accepted=self.accepted,
            replies=self.replies,
            uplink=self.uplink,
            outbox=self.outbox,
            faults=self.faults,
            metrics=self.metrics,
            executor=self._executor,
            threads=threads,
            post=self.post,
            clock=clock,
            timers=self._timers,
            stopping=lambda: self._stopping,
            watch=lambda fd: self._poller.register(fd, select.POLLIN),
            unwatch=self._poller.unregister,
        )
        self.specs = SpecIntake(
            self._settings,
            topics=self.topics,
            store=store,
            pool=pool,
            deployments=self.deployments,
            outbox=self.outbox,
            uplink=self.uplink,
            faults=self.faults,
            spec_index=self.spec_index,
            timers=self._timers,
            clock=clock,
        )
        self.telemetry = Telemetry(
            self._settings,
            topics=self.topics,
            uplink=self.uplink,
            store=store,
            pool=pool,
            metrics=self.metrics,
            notifier=notifier,
            sync=self.sync,
            deployments=self.deployments,
            identities=self.identities,
            outbox=self.outbox,
            faults=self.faults,
            inflight=lambda: len(self.invocations.inflight),
            clock=clock,
        )

    # -- what tests, cli and scripts reach ------------------------------------------------

    @property
    def mqtt(self) -> Transport | None:
        """The MQTT client (``cli.build_agent`` assigns it; a test may assign a fake)."""
        return self.uplink.client

    @mqtt.setter
    def mqtt(self, client: Transport | None) -> None:
        self.uplink.client = client

    @property
    def _inflight(self) -> dict[str, Invocation]:
        """Invocations accepted and not yet answered (``scripts/bench_mqtt.py`` reads it)."""
        return self.invocations.inflight

    @property
    def _store_fault(self) -> str | None:
        """Why the store fails now, if it does (read by :meth:`_sweep_outbox`)."""
        return self.faults.reason

    def _settings(self) -> Config:
        """The running config, for collaborators (a reload replaces ``self.config``)."""
        return self.config

    # -- plumbing ---------------------------------------------------------------------------

    def post(self, event: object) -> None:
        """Hand an event to the loop; safe from any thread and from signal handlers."""
        self._events.put(event)
        if self._waiting and self._wake is not None:  # put first: see _wait
            with contextlib.suppress(OSError):  # closed: the loop has stopped
                os.eventfd_write(self._wake, 1)

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda s, _f: self.post(_Signal(s)))

    def request_stop(self) -> None:
        self.post(_Signal(signal.SIGTERM))

    # -- lifecycle --------------------------------------------------------------------------

    def boot(self) -> None:
        """Load local state and serve it: no broker needed. Sends READY=1."""
        repaired = open_store(self.store)  # a damaged file is moved aside: salvaged below
        self.sync.boot()
        isolation = self.identities.start(self.pool.python)
        if isolation.mode == "uid":
            if self.pool.user:
                log.warning("runtime.worker_user is ignored: each function has its own uid")
                self.pool.user = None
            log.info(
                "functions run under uids of their own (%s)", self.config.runtime.function_uids
            )
            leftovers = self.pool.sweep(self.identities.uids())
            if leftovers:  # a previous agent died (kill -9) and its functions' children lived
                log.warning("killed %d processes left by functions before this start", leftovers)
        else:
            log.warning(
                "functions share one uid and can read what it can (isolation: shared-uid): %s",
                isolation.reason,
            )
        self.pool.start()
        if repaired is not None:
            salvage(self.store, self.deployments, repaired)
        restored = self.deployments.restore()
        log.info("restored %d deployed functions from %s", restored, self.store.path)
        self.deployer.start()
        self.deployments.reconcile_all()
        self.notifier.ready()
        self._update_status_line()
        now = self._clock()
        self._timers.clear()  # the table is shared with the collaborators: never replaced
        self._timers.update({"heartbeat": now, "prune": now + 60.0})
        interval = self.notifier.watchdog_interval()
        if interval:
            self._timers["watchdog"] = now

    def run(self) -> int:
        self.boot()
        if self.mqtt is not None:
            self.mqtt.start()
        while not self._stopping:
            self.step(self._next_timer_in())
        return self.shutdown()

    def step(self, timeout: float = 0.0) -> int:
        """Handle the events queued now (waiting up to ``timeout`` seconds for the first;
        at most :data:`BATCH_MAX`), then run the timers that are due; how many events.
        ``run`` is this in a loop; in-process tests call it directly.

        Events are handled in their order; a run of finished invocations (or of PUBACKs)
        among them is handled as one, so its writes share one transaction (group commit),
        and the client wakes its network thread once for the whole batch."""
        batch = self._take([])
        if not batch or self.invocations.direct_count:
            # Workers' answers join the batch (their replies share its transaction).
            self._answers_into(batch, self._wait(0.0 if batch else timeout))
            batch = self._take(batch)
            self._gather_answers(batch)
        if self.invocations.direct_count:
            with self._guarded("a worker's deadline"):
                batch += self.invocations.expire_direct(time.monotonic())
        if batch:
            client = self.mqtt
            with contextlib.nullcontext() if client is None else client.corked():
                self._dispatch_batch(batch)
        try:
            self._run_timers()
        except StoreError as exc:  # a failing store must not stop the loop (or the watchdog)
            if not self.faults.failed(exc, "running timers"):
                log.error("timer: %s", exc)
        return len(batch)

    def _answers_into(self, batch: list[Any], ready: list[int]) -> int:
        """The finished invocations of the worker fds ``ready``, appended; how many."""
        found = 0
        with self._guarded("a worker's answer"):
            for fd in ready:
                done = self.invocations.worker_readable(fd)
                if done is not None:
                    batch.append(done)
                    found += 1
        return found

    def _gather_answers(self, batch: list[Any]) -> None:
        """Group commit under load: while other calls run on workers the loop drives and
        calls wait behind them, wait up to ``agent.commit_delay_ms`` for more answers (or
        :data:`COMMIT_GROUP` of them), so one transaction and one drain serve several
        replies: a function's ``concurrency`` bounds what finishes at once. Each answer
        starts the next waiting call at once, and what is posted meanwhile joins the
        batch; nothing waits when no call does (one at a time pays no delay)."""
        delay = self.config.agent.commit_delay_ms / 1000.0
        invocations = self.invocations
        if delay <= 0 or not invocations.direct_count or not invocations.waiting():
            return
        answers = sum(1 for event in batch if type(event) is InvokeDone)
        if not answers:
            return
        deadline = time.monotonic() + delay
        while answers < COMMIT_GROUP and invocations.direct_count and invocations.waiting():
            now = time.monotonic()
            left = deadline - now
            due = invocations.next_direct_deadline()
            if left <= 0 or len(batch) >= BATCH_MAX or (due is not None and due <= now):
                break  # (a call past its deadline is answered now, not after the delay)
            answers += self._answers_into(batch, self._wait(left))
            self._take(batch)  # what was posted meanwhile joins too (or _wait would spin)

    def _take(self, batch: list[Any]) -> list[Any]:
        """``batch`` and whatever is queued now, up to :data:`BATCH_MAX` events."""
        take = self._events.get_nowait
        while len(batch) < BATCH_MAX:
            try:
                batch.append(take())
            except queue.Empty:
                break
        return batch

    def _wait(self, timeout: float) -> list[int]:
        """Wait up to ``timeout`` s (less if a worker's deadline comes first) until an event
        is posted or a watched worker fd is readable; those fds.

        ``post`` puts its event before it reads ``_waiting``, and we set ``_waiting``
        before we look at the queue: either we see the event, or it sees us waiting and
        writes the eventfd. No event is left waiting for the next timer."""
        if self._wake is None:  # the first wait (the constructor touches no fd)
            self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._poller.register(self._wake, select.POLLIN)
        deadline = self.invocations.next_direct_deadline()
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
        self._waiting = True
        try:
            if not self._events.empty():
                timeout = 0.0
            ready = self._poller.poll(max(0, math.ceil(timeout * 1000)))
        finally:
            self._waiting = False
        fds = []
        for fd, _mask in ready:
            if fd == self._wake:
                with contextlib.suppress(OSError):
                    os.eventfd_read(fd)  # back to 0: not readable until the next post
            else:
                fds.append(fd)
        return fds

    def run_until_idle(self, max_events: int = 10_000) -> int:
        """Handle every event queued now and those their handling queues (no waiting), and
        run due timers; how many events. Threads (deployer, executor) may post more later."""
        handled = 0
        while handled < max_events:
            taken = self.step(0.0)
            if not taken:
                break
            handled += taken
        return handled

    @property
    def stopping(self) -> bool:
        """A stop was asked for (SIGTERM, SIGINT): ``run`` drains and returns."""
        return self._stopping

    def _dispatch_batch(self, batch: list[Any]) -> None:
        run: list[Any] = []
        for event in batch:
            if run and type(event) is not type(run[0]):
                self._dispatch_run(run)
                run = []
            if isinstance(event, InvokeDone | Published):
                run.append(event)
            else:
                self._dispatch(event)
        if run:
            self._dispatch_run(run)

    def _dispatch_run(self, run: list[Any]) -> None:
        """A run of finished invocations or of PUBACKs (one of them: as any event)."""
        if len(run) == 1:
            self._dispatch(run[0])
            return
        with self._guarded(f"{len(run)} {type(run[0]).__name__}"):
            if isinstance(run[0], InvokeDone):
                self.invocations.handle_invokes_done(run)
            else:
                self.handle_published_many(run)

    def _dispatch(self, event: object) -> None:
        with self._guarded(type(event).__name__):
            if isinstance(event, Message):
                self.handle_message(event)
            elif isinstance(event, InvokeDone):
                self.handle_invoke_done(event)
            elif isinstance(event, Published):
                self.handle_published(event)
            elif isinstance(event, DeployOutcome):
                self.handle_deploy_outcome(event)
            elif isinstance(event, Connected):
                self.handle_connected(event)
            elif isinstance(event, Disconnected | ConnectFailed):
                self.handle_disconnected(event)
            elif isinstance(event, _Signal):
                self.handle_signal(event)

    @contextlib.contextmanager
    def _guarded(self, what: str) -> Iterator[None]:
        """One bad event (or run) never stops the agent: its error is logged, and a fault
        of the store noted (degraded mode)."""
        try:
            yield
        except StoreError as exc:
            if not self.faults.failed(exc, f"handling {what}"):
                log.error("while handling %s: %s", what, exc)
        except AgentError as exc:
            log.error("while handling %s: %s", what, exc)
        except Exception:
            log.exception("bug while handling %s", what)

    def shutdown(self) -> int:
        """Drain in-flight invocations and the outbox within the grace period, then exit 0."""
        clock = self._clock
        inflight = self.invocations.inflight
        grace = self.config.agent.shutdown_grace_s
        deadline = clock() + grace
        log.info("stopping: %d invocations in flight, grace %.1fs", len(inflight), grace)
        while inflight and clock() < deadline:
            self.step(min(0.1, deadline - clock()))
        while self.uplink.connected and not self._outbox_drained() and clock() < deadline:
            self.outbox.release_held()  # no delta lingers past the stop
            self.outbox.drain()
            self.step(min(0.1, deadline - clock()))
        if self.mqtt is not None:
            if self.uplink.connected:
                mid = self.telemetry.publish_status("offline")
                self._await_puback(mid, min(2.0, max(0.1, deadline - clock())))
            self.mqtt.stop()
        self.deployer.stop()
        self.invocations.abandon_direct("the agent (stopping)")
        self.pool.close()
        self.pool.sweep(self.identities.uids())  # nothing a function started outlives us
        self.sync.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._guarded("deleting the delivered outbox items"):
            self.outbox.flush_acked()  # or the next start sends them again
        depth = self.store.outbox_depth()
        self.store.close()
        if self._wake is not None:
            os.close(self._wake)
            self._wake = None
        log.info("stopped; %d messages left in the outbox for next time", depth[0])
        return 0

    def _outbox_drained(self) -> bool:
        """Shutdown: nothing left to deliver (or the store fails: the next start sends what
        is left, and the stop goes on)."""
        try:
            return self.outbox.idle()
        except StoreError as exc:
            self.faults.failed(exc, "stopping")
            return True

    def _await_puback(self, mid: int, wait: float) -> None:
        """Shutdown only: wait up to ``wait`` seconds for the PUBACK of ``mid``."""
        deadline = self._clock() + wait
        while wait and self._clock() < deadline:
            try:
                event = self._events.get(timeout=max(0.0, deadline - self._clock()))
            except queue.Empty:
                break
            if isinstance(event, Published) and event.mid == mid:
                break
            if isinstance(event, Published):
                self.handle_published(event)

    # -- MQTT connection --------------------------------------------------------------------

    def handle_connected(self, event: Connected) -> None:
        if self.mqtt is not None:  # a poison message set aside must not be resent by paho
            self.outbox.forget = self.mqtt.forget
        self.uplink.connected = self.outbox.connected = True
        try:
            self.store.set_meta("last_connect_ts", protocol.now_ts())
        except StoreError as exc:
            if not self.faults.failed(exc, "recording the connect"):
                raise
        log.info("connected to the broker (session present: %s)", event.session_present)
        if self.spec_index is not None:
            self.spec_index.connected()
        self.telemetry.publish_status("online")
        if not event.session_present:  # a broker without persistence lost retained messages
            count = self.specs.republish_states()
            log.info("new broker session: republished the retained state of %d functions", count)
        self._timers["heartbeat"] = self._clock()
        if not self.invocations.recovered:
            self.invocations.recover_accepted()
        self.outbox.drain()
        self._update_status_line()

    def handle_disconnected(self, event: Disconnected | ConnectFailed) -> None:
        if self.uplink.connected:
            log.warning("lost the broker: %s", event.reason)
        else:
            log.debug("broker unreachable: %s", event.reason)
        self.uplink.connected = self.outbox.connected = False
        self._update_status_line()

    def handle_published(self, event: Published) -> None:
        """A PUBACK: the pump deletes, retries or dead-letters its item (see agent.edge.outbox)."""
        self.handle_published_many([event])

    def handle_published_many(self, events: list[Published]) -> None:
        """A run of PUBACKs, with one delete for all the delivered items."""
        before = self.outbox.dead_lettered
        acks = [(e.mid, e.reason_code, e.reason) for e in events]
        not_ours = set(self.outbox.acknowledged_many(acks))
        for event in events:
            if event.refused and event.mid in not_ours:  # a status or a direct publish
                log.warning("the broker refused message %d: %s", event.mid, event.reason)
        if self.outbox.dead_lettered != before:
            self.telemetry.refresh_dead_letters()

    def _announce_status(self) -> None:
        """The retained status again (its "degraded" reasons changed), when connected."""
        if self.uplink.live:
            self.telemetry.publish_status("online")

    # -- incoming messages ------------------------------------------------------------------

    def handle_message(self, msg: Message) -> None:
        kind, fid = self.topics.classify(msg.topic)
        if kind == "invoke":
            try:
                self.handle_invoke(msg)
            except StoreError as exc:
                if not self.faults.failed(exc, "handling an invoke"):
                    raise
                self.invocations.refuse_on_store_fault(msg)
            return  # acknowledged once answered
        try:
            if kind in ("fleet_spec", "node_spec") and fid is not None:
                if self.spec_index is not None:
                    self.spec_index.spec_seen(msg.topic)
                try:
                    self._store_spec(kind, fid, msg.payload)
                except StoreError as exc:
                    if not self.faults.failed(exc, f"storing the spec on {msg.topic}"):
                        raise
                    # Retained, but not sent again on this connection: kept until it works.
                    self.faults.defer_spec(msg.topic, kind, fid, msg.payload)
            elif kind == "sync_desired":
                if self.sync.on_desired(msg.payload) and self.uplink.connected:
                    self.telemetry.publish_status("online")  # its retained sync.desired_version
            elif kind == "sync_request":
                self.sync.on_request(msg.payload)
            elif kind in ("fleet_index", "node_index", "rollcall"):
                self.specs.on_index_or_rollcall(kind, msg.payload)
            else:
                log.debug("ignoring message on %s", msg.topic, extra={"topic": msg.topic})
        finally:
            self.uplink.ack(msg)

    def handle_invoke(self, msg: Message) -> None:
        """An invoke request (see :class:`agent.edge.invocations.Invocations`)."""
        self.invocations.handle_invoke(msg)

    def handle_invoke_done(self, done: InvokeDone) -> None:
        """An invocation thread's outcome: answer it."""
        self.invocations.handle_invoke_done(done)

    def _forget_accepted(self, rid: str) -> None:
        self.invocations.forget_accepted(rid)

    # -- deployments ------------------------------------------------------------------------

    def _store_spec(self, kind: str, fid: str, payload: bytes) -> None:
        if self.specs.on_spec(kind, fid, payload):
            self._update_status_line()

    def handle_deploy_outcome(self, outcome: DeployOutcome) -> None:
        if outcome.disk_error is not None:  # the state dir's disk: retried on recovery
            fault = StoreError(f"installing {outcome.job.spec.id}: {outcome.disk_error}")
            fault.__cause__ = outcome.disk_error
            self.faults.failed(fault, f"installing {outcome.job.spec.id}")
        self.deployments.on_outcome(outcome)
        self._update_status_line()

    def _report_state(
        self,
        fid: str,
        version: str | None,
        sha256: str | None,
        state: str,
        error: dict[str, str] | None,
        active_version: str | None,
    ) -> None:
        """The deployment controller's report (built before ``specs``, which owns it)."""
        self.specs.report_state(fid, version, sha256, state, error, active_version)

    def _catch_up(self) -> None:
        """After a store fault: deploy again what the rows do not say is deployed, and
        publish every function's state from the rows."""
        self.deployments.reconcile_all()
        self.specs.republish_states()

    # -- timers -----------------------------------------------------------------------------

    def _sweep_outbox(self) -> None:
        """The outbox_sweep timer (:func:`agent.edge.store_faults.sweep_outbox`).

        Reads only ``_store_fault``, ``outbox``, ``store``, ``_timers`` and
        ``_update_status_line``: tests/test_sync_mirror.py calls it on a stand-in.
        """
        sweep_outbox(
            fault=self._store_fault,
            outbox=self.outbox,
            store=self.store,
            timers=self._timers,
            done=self._update_status_line,
        )

    def _next_timer_in(self) -> float:
        if not self._timers:
            return 1.0
        return max(0.0, min(self._timers.values()) - self._clock())

    def _run_timers(self) -> None:
        now = self._clock()
        timers = self._timers
        if timers.get("heartbeat", now + 1) <= now:
            timers["heartbeat"] = now + self.config.agent.heartbeat_interval_s
            self.telemetry.heartbeat()
        if timers.get("watchdog", now + 1) <= now:
            interval = self.notifier.watchdog_interval() or 1.0
            timers["watchdog"] = now + interval
            self.notifier.watchdog()  # from the loop only: a stuck loop stops the pings
        if timers.get(RECORD_TIMER, now + 1) <= now:
            self.invocations.record_due(now)
        if timers.get("store_retry", now + 1) <= now:
            self.faults.retry()
        if timers.get("rollcall", now + 1) <= now:
            self.specs.rollcall_answered(now)
            if self.uplink.connected:  # answered live: a controller cannot read retained ones
                self.telemetry.publish_status("online")
                self.specs.republish_states()
        if timers.get("outbox_sweep", now + 1) <= now:
            self._sweep_outbox()
        if timers.get("prune", now + 1) <= now:
            timers["prune"] = now + 60.0
            self.store.dedupe_prune(time.time() - self.config.agent.dedupe_window_s)
        if timers.get("dead_letters", now) <= now:  # cleared or retried by the CLI?
            timers["dead_letters"] = now + 2.0
            self.telemetry.refresh_dead_letters()
        # Delivered outbox items no group commit deleted within their linger.
        if timers.get("outbox_acks", now + 1) <= now:
            timers.pop("outbox_acks")
            with self._guarded("deleting delivered outbox items"):  # not the other timers
                self.outbox.flush_acked()
        acked_at = self.outbox.acked_due_at()
        if acked_at is not None:
            timers["outbox_acks"] = acked_at
        # Refused outbox items waiting out their backoff (none while disconnected).
        if timers.get("outbox_retry", now + 1) <= now:
            self.outbox.retry_due()
        retry_at = self.outbox.next_retry_at()
        if retry_at is None:
            timers.pop("outbox_retry", None)
        else:
            timers["outbox_retry"] = retry_at

    def _update_status_line(self) -> None:
        self.telemetry.update_status_line()

    # -- signals ----------------------------------------------------------------------------

    def handle_signal(self, event: _Signal) -> None:
        if event.signum == signal.SIGHUP:
            self.reload()
            return
        if not self._stopping:
            log.info("received %s: shutting down", signal.Signals(event.signum).name)
            self._stopping = True
            self.notifier.stopping()

    def reload(self) -> None:
        """SIGHUP: apply what can change without a restart; say what cannot."""
        if not self.config_path:
            return
        self.notifier.reloading()
        try:
            change = read_reload(self.config_path, self.config)
        except AgentError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self.notifier.ready()
            return
        new, running, restart_needed = change.new, change.running, change.restart_needed
        set_level(new.agent.log_level)
        self.store.set_limits(max_messages=new.outbox.max_messages, max_bytes=new.outbox.max_bytes)
        self.outbox.delta_linger_s = new.outbox.delta_linger_ms / 1000.0
        self.pool.reconfigure(
            max_workers=new.runtime.max_workers,
            max_queue=new.runtime.max_queue,
            max_invocations=new.runtime.worker_max_invocations,
            prestart=new.runtime.prestart,
        )
        self.deployer.runtime = running.runtime
        self.deployments.set_trust(change.trust)  # a removed key is revoked now
        self.config = running
        self.invocations.arm_record_timer()  # record_accepted_after_s applies to what waits
        if self.uplink.connected:
            self.telemetry.publish_status("online")  # its retained "trust" may have changed
        if self._timers.get("heartbeat"):
            self._timers["heartbeat"] = self._clock() + new.agent.heartbeat_interval_s
        log.info("reloaded %s", self.config_path)
        if restart_needed:
            log.warning("changes to %s take effect after a restart", ", ".join(restart_needed))
        self.notifier.ready()
