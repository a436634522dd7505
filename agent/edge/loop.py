"""``Agent``: the gateway daemon's event loop. One thread owns all mutable state.

Everything else only enqueues: paho's network thread (:mod:`agent.mqtt` events), signal
handlers, invocation threads (results) and the deployer thread (outcomes). The loop
dispatches each event to a ``handle_<event>`` method and runs its timers (heartbeat,
watchdog, dedupe pruning) on the monotonic clock.

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
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent import __version__, mqtt
from agent.config import Config, load_config
from agent.contract import protocol
from agent.contract.specindex import AnswerBudget, IndexFollower, rollcall_delay
from agent.edge.deploy_prepare import Deployer, DeployOutcome
from agent.edge.deploy_reconcile import DeploymentController
from agent.edge.invoke_queue import FairQueue, Limits
from agent.edge.isolation import FunctionIdentities
from agent.edge.outbox import OutboxPump
from agent.edge.statesync import StateSync
from agent.edge.systemd import Notifier, set_level
from agent.errors import (
    AgentError,
    BadRequest,
    DeploymentRejected,
    EdgeExecutionError,
    FunctionNotFound,
    HandlerError,
    Overloaded,
    StateConflict,
    StoreError,
    error_to_dict,
)
from agent.exec.metrics import EdgeMetrics, InvocationRecord, system_metrics
from agent.exec.pool import InvokeResult, WorkerPool
from agent.store import OutboxFull, ReplyRecord, StateTooLarge, Store
from agent.store.accepted import AcceptedInvoke, AcceptedInvokes
from agent.store.core import salvage_deployments, store_fault
from agent.trust import TrustPolicy

log = logging.getLogger(__name__)

#: The retained status is republished (fresh ``ts``) every this many heartbeats, so a view
#: that sees only retained messages can tell a node whose Last Will was lost (its broker
#: node died with it) from a live one; docs/scaling.md weighs the broker load.
STATUS_REFRESH_HEARTBEATS = 3
#: How often a failing store (disk full, I/O error) is probed for writes again (monotonic).
STORE_RETRY_S = 1.0


@dataclass
class _Invocation:
    request: protocol.InvokeRequest
    #: (reply topic, MQTT 5 correlation data) of the request and of duplicates seen meanwhile.
    targets: list[tuple[str, bytes | None]]
    #: Incoming messages to acknowledge once the reply is in the outbox.
    acks: list[mqtt.Message]
    started: float = field(default_factory=time.monotonic)
    #: The reply committed with the invocation's state changes (to ``targets[0]``), set
    #: by the invocation thread once they are on disk.
    committed_reply: bytes | None = None
    #: Its write set applied in memory (StateSync.apply), and the reply that goes with it.
    state_ticket: int = 0
    pending_reply: bytes | None = None


@dataclass(frozen=True)
class _InvokeDone:
    invocation: _Invocation
    result: InvokeResult | None
    error: EdgeExecutionError | None


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
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.store = store
        self.pool = pool
        self.notifier = notifier
        # Heartbeats read counters and percentiles only: no per-invocation record log.
        self.metrics = metrics or EdgeMetrics(history=0)
        self.topics = protocol.Topics(config.mqtt.topic_prefix, config.node.id)
        #: Exact-topic spec subscriptions from the retained indexes (agent.contract.specindex).
        mode = config.mqtt.retained_wildcards
        self.spec_index = IndexFollower(self.topics, mode) if mode != "yes" else None
        self._rollcall_budget = AnswerBudget()  # a flood of roll calls: a bounded rate
        self.mqtt: mqtt.MqttClient | None = None
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
        self._executor = ThreadPoolExecutor(
            max_workers=config.runtime.max_workers * 2, thread_name_prefix="edge-invoke"
        )
        self._inflight: dict[str, _Invocation] = {}
        #: Accepted invokes recorded durably (acknowledged at once) until answered.
        self.accepted = AcceptedInvokes(store)
        self._accepted_rids: set[str] = set()
        self._recovered = False
        #: Accepted invocations per function, fairly bounded and dispatched (issue 12).
        self._queue: FairQueue[_Invocation] = FairQueue(self._queue_limits)
        self.outbox = OutboxPump(
            store,
            self._publish_item,
            delta_linger_s=config.outbox.delta_linger_ms / 1000.0,
        )
        self.sync = StateSync(
            store,
            self.topics,
            self.outbox,
            Path(config.agent.state_dir) / "sync.hwm",
            max_payload=config.agent.max_payload_bytes,
        )
        self._stopping = False
        self._started = time.monotonic()
        self._heartbeat_seq = 0
        self._timers: dict[str, float] = {}
        self._connected = False
        self._dead_letters: int | None = None  # read from the store when first needed
        #: Why the store fails (disk full, I/O error), while it does: "degraded" until a
        #: probe on the store_retry timer writes again (issue 12).
        self._store_fault: str | None = None
        self._store_fault_since = 0.0
        #: Specs that could not be stored meanwhile, by topic (the newest wins): replayed.
        self._deferred_specs: dict[str, tuple[str, str, bytes]] = {}
        #: Answered invokes whose accepted record could not be deleted meanwhile.
        self._uncleared_accepted: set[str] = set()

    # -- plumbing ---------------------------------------------------------------------------

    def post(self, event: object) -> None:
        """Hand an event to the loop; safe from any thread and from signal handlers."""
        self._events.put(event)

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda s, _f: self.post(_Signal(s)))

    def request_stop(self) -> None:
        self.post(_Signal(signal.SIGTERM))

    # -- lifecycle --------------------------------------------------------------------------

    def boot(self) -> None:
        """Load local state and serve it: no broker needed. Sends READY=1."""
        self.store.open(repair=True)  # PRAGMA quick_check; a damaged file is moved aside
        repaired = self.store.repaired
        if repaired is not None and self.store.repaired_now:
            log.error(
                "the state database was damaged (%s): moved to %s and replaced by an empty "
                "one; outbox messages lost: %s; functions come back as their retained specs "
                "arrive",
                "; ".join(repaired["problems"]),
                repaired["moved_to"],
                "unknown" if repaired["lost_outbox"] is None else repaired["lost_outbox"],
            )
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
        if repaired is not None and self.store.repaired_now:
            self._salvage(repaired)
        restored = self.deployments.restore()
        log.info("restored %d deployed functions from %s", restored, self.store.path)
        self.deployer.start()
        self.deployments.reconcile_all()
        self.notifier.ready()
        self._update_status_line()
        now = time.monotonic()
        self._timers = {"heartbeat": now, "prune": now + 60.0}
        interval = self.notifier.watchdog_interval()
        if interval:
            self._timers["watchdog"] = now

    def run(self) -> int:
        self.boot()
        if self.mqtt is not None:
            self.mqtt.start()
        while not self._stopping:
            self._step(self._next_timer_in())
        return self._shutdown()

    def _step(self, timeout: float) -> None:
        try:
            event = self._events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            event = None
        if event is not None:
            self._dispatch(event)
        try:
            self._run_timers()
        except StoreError as exc:  # a failing store must not stop the loop (or the watchdog)
            if not self._store_failed(exc, "running timers"):
                log.error("timer: %s", exc)

    def _dispatch(self, event: object) -> None:
        try:
            if isinstance(event, mqtt.Message):
                self.handle_message(event)
            elif isinstance(event, _InvokeDone):
                self.handle_invoke_done(event)
            elif isinstance(event, mqtt.Published):
                self.handle_published(event)
            elif isinstance(event, DeployOutcome):
                self.handle_deploy_outcome(event)
            elif isinstance(event, mqtt.Connected):
                self.handle_connected(event)
            elif isinstance(event, mqtt.Disconnected | mqtt.ConnectFailed):
                self.handle_disconnected(event)
            elif isinstance(event, _Signal):
                self.handle_signal(event)
        except StoreError as exc:
            if not self._store_failed(exc, f"handling {type(event).__name__}"):
                log.error("while handling %s: %s", type(event).__name__, exc)
        except AgentError as exc:  # one bad event never stops the agent
            log.error("while handling %s: %s", type(event).__name__, exc)
        except Exception:
            log.exception("bug while handling %s", type(event).__name__)

    def _shutdown(self) -> int:
        """Drain in-flight invocations and the outbox within the grace period, then exit 0."""
        grace = self.config.agent.shutdown_grace_s
        deadline = time.monotonic() + grace
        log.info("stopping: %d invocations in flight, grace %.1fs", len(self._inflight), grace)
        while self._inflight and time.monotonic() < deadline:
            self._step(min(0.1, deadline - time.monotonic()))
        while self._connected and not self.outbox.idle() and time.monotonic() < deadline:
            self.outbox.release_held()  # no delta lingers past the stop
            self.outbox.drain()
            self._step(min(0.1, deadline - time.monotonic()))
        if self.mqtt is not None:
            if self._connected:
                self._publish_status(
                    "offline", wait=min(2.0, max(0.1, deadline - time.monotonic()))
                )
            self.mqtt.stop()
        self.deployer.stop()
        self.pool.close()
        self.pool.sweep(self.identities.uids())  # nothing a function started outlives us
        self.sync.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        depth = self.store.outbox_depth()
        self.store.close()
        log.info("stopped; %d messages left in the outbox for next time", depth[0])
        return 0

    # -- MQTT connection --------------------------------------------------------------------

    def handle_connected(self, event: mqtt.Connected) -> None:
        if self.mqtt is not None:  # a poison message set aside must not be resent by paho
            self.outbox.forget = self.mqtt.forget
        self._connected = self.outbox.connected = True
        try:
            self.store.set_meta("last_connect_ts", protocol.now_ts())
        except StoreError as exc:
            if not self._store_failed(exc, "recording the connect"):
                raise
        log.info("connected to the broker (session present: %s)", event.session_present)
        if self.spec_index is not None:
            self.spec_index.connected()
        self._publish_status("online")
        if not event.session_present:  # a broker without persistence lost retained messages
            count = self._republish_states()
            log.info("new broker session: republished the retained state of %d functions", count)
        self._timers["heartbeat"] = time.monotonic()
        if not self._recovered:
            self._recover_accepted()
        self.outbox.drain()
        self._update_status_line()

    def handle_disconnected(self, event: mqtt.Disconnected | mqtt.ConnectFailed) -> None:
        if self._connected:
            log.warning("lost the broker: %s", event.reason)
        else:
            log.debug("broker unreachable: %s", event.reason)
        self._connected = self.outbox.connected = False
        self._update_status_line()

    def handle_published(self, event: mqtt.Published) -> None:
        """A PUBACK: the pump deletes, retries or dead-letters its item (see agent.edge.outbox)."""
        before = self.outbox.dead_lettered
        ours = self.outbox.acknowledged(event.mid, event.reason_code, event.reason)
        if event.refused and not ours:  # a status or a direct publish: nothing to keep
            log.warning("the broker refused message %d: %s", event.mid, event.reason)
        if self.outbox.dead_lettered != before:
            self._refresh_dead_letters()

    def _refresh_dead_letters(self) -> None:
        """Re-read the dead letters (the CLI may clear or retry them); announce a change."""
        count, marked = self.store.dead_letter_counts()
        if marked and self.store.dead_letters_requeue():
            log.info("dead letters put back in the outbox at the operator's request")
            count, _ = self.store.dead_letter_counts()
            self.outbox.drain()
        if count == self._dead_letters:
            return
        was, self._dead_letters = self._dead_letters, count
        if was is None and not count:
            return  # the first look, at start: nothing to announce
        if count and not was:
            log.warning("degraded: %d dead letters (edge-agent status lists them)", count)
        elif not count:
            log.info("no dead letters left: online again")
        if self._connected and self.mqtt is not None:
            self._publish_status("online")  # becomes "degraded" while dead letters remain

    def _degraded(self) -> list[str]:
        """Why this node is degraded (the status's "degraded" list); empty when it is not."""
        if self._dead_letters is None:
            self._dead_letters = self.store.dead_letter_counts()[0]
        if not self._dead_letters:
            return []
        newest = self.store.dead_letters(1)
        about = f" (newest: {newest[0].topic}: {newest[0].reason})" if newest else ""
        return [f"dead_letters: {self._dead_letters} messages the broker refused for good{about}"]

    def _publish_item(
        self, topic: str, payload: bytes, qos: int, retain: bool, correlation: bytes | None
    ) -> int:
        assert self.mqtt is not None
        return self.mqtt.publish(
            topic, payload, qos=qos, retain=retain, correlation_data=correlation
        )

    def _publish_status(self, status: str, wait: float = 0.0) -> None:
        assert self.mqtt is not None
        node = self.config.node
        degraded = self._degraded_reasons()
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
                "functions": len(self.pool.functions()),
                "sync": self.sync.summary(),
                "trust": self.deployments.trust_mode,  # "unsigned" is visible from the cloud
                "isolation": self.identities.isolation.mode,  # "shared-uid" too
                "dead_letters": self._dead_letters or 0,
                **({"degraded": degraded} if degraded else {}),
                **({"store_repaired": self.store.repaired} if self.store.repaired else {}),
                # A view that reads only this retained message (edgectl nodes) judges
                # staleness from ts: republished every status_refresh_s (docs/scaling.md).
                "heartbeat_interval_s": self.config.agent.heartbeat_interval_s,
                "status_refresh_s": self.config.agent.heartbeat_interval_s
                * STATUS_REFRESH_HEARTBEATS,
            },
        )
        mid = self.mqtt.publish(self.topics.status, payload, qos=1, retain=True)
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline:  # shutdown only: wait for the PUBACK
            try:
                event = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if isinstance(event, mqtt.Published) and event.mid == mid:
                break
            if isinstance(event, mqtt.Published):
                self.handle_published(event)

    # -- incoming messages ------------------------------------------------------------------

    def handle_message(self, msg: mqtt.Message) -> None:
        kind, fid = self.topics.classify(msg.topic)
        if kind == "invoke":
            try:
                self.handle_invoke(msg)
            except StoreError as exc:
                if not self._store_failed(exc, "handling an invoke"):
                    raise
                self._refuse_on_store_fault(msg)
            return  # acknowledged once answered
        try:
            if kind in ("fleet_spec", "node_spec") and fid is not None:
                if self.spec_index is not None:
                    self.spec_index.spec_seen(msg.topic)
                try:
                    self._on_spec(kind, fid, msg.payload)
                except StoreError as exc:
                    if not self._store_failed(exc, f"storing the spec on {msg.topic}"):
                        raise
                    # Retained, but not sent again on this connection: kept until it works.
                    self._deferred_specs[msg.topic] = (kind, fid, msg.payload)
            elif kind == "sync_desired":
                if self.sync.on_desired(msg.payload) and self._connected:
                    self._publish_status("online")  # its retained sync.desired_version
            elif kind == "sync_request":
                self.sync.on_request(msg.payload)
            elif kind in ("fleet_index", "node_index", "rollcall"):
                self._on_index_or_rollcall(kind, msg.payload)
            else:
                log.debug("ignoring message on %s", msg.topic, extra={"topic": msg.topic})
        finally:
            self._ack(msg)

    def _on_index_or_rollcall(self, kind: str, payload: bytes) -> None:
        """A retained spec index (subscribe to the exact spec topics it lists, for brokers
        without retained wildcards) or a roll call (answer within its window)."""
        try:
            if kind == "rollcall":  # one answer covers every call pending, within budget
                due = self._rollcall_budget.due(time.monotonic(), rollcall_delay(payload))
                self._timers["rollcall"] = min(self._timers.get("rollcall", due), due)
                return
            if self.spec_index is None or self.mqtt is None:
                return
            scope = "fleet" if kind == "fleet_index" else "node"
            change = self.spec_index.on_index(scope, payload)
        except BadRequest as exc:
            log.warning("ignoring bad %s: %s", kind.replace("_", " "), exc)
            return
        if change.subscribe:
            log.info("spec index: subscribing to %s", ", ".join(change.subscribe))
            self.mqtt.subscribe(change.subscribe)
        if change.unsubscribe:
            log.info("spec index: unsubscribing from %s", ", ".join(change.unsubscribe))
            self.mqtt.unsubscribe(change.unsubscribe)

    def _on_spec(self, kind: str, fid: str, payload: bytes) -> None:
        scope = "fleet" if kind == "fleet_spec" else "node"
        if self._spec_too_big(fid, payload):
            return  # acknowledged by the caller; never parsed
        self.deployments.on_spec(scope, fid, payload)
        self._update_status_line()

    def _spec_too_big(self, fid: str, payload: bytes) -> bool:
        """Over ``agent.max_spec_bytes``: reported rejected without parsing a byte of it."""
        limit = self.config.agent.max_spec_bytes
        if len(payload) <= limit:
            return False
        error = DeploymentRejected(
            f'function spec "{fid}" is {len(payload)} bytes, over agent.max_spec_bytes '
            f"({limit}); send big code by reference (code {{url, sha256, size}})"
        )
        log.warning("rejected spec for %s: %s", fid, error, extra={"function_id": fid})
        row = self.store.get_deployment(fid)
        active = row.active_version if row is not None else None
        self._report_state(fid, None, None, "rejected", error_to_dict(error), active)
        return True

    def _ack(self, msg: mqtt.Message) -> None:
        if self.mqtt is not None:
            self.mqtt.ack(msg)

    # -- deployments ------------------------------------------------------------------------

    def handle_deploy_outcome(self, outcome: DeployOutcome) -> None:
        if outcome.disk_error is not None:  # the state dir's disk: retried on recovery
            fault = StoreError(f"installing {outcome.job.spec.id}: {outcome.disk_error}")
            fault.__cause__ = outcome.disk_error
            self._store_failed(fault, f"installing {outcome.job.spec.id}")
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
        payload = protocol.encode_function_state(
            fid,
            version,
            sha256,
            state,
            error,
            # how memory_mb is enforced: per process (rlimit) or also for its whole tree
            extra={"active_version": active_version, "limits": self.pool.limits_mode(fid)},
        )
        self._enqueue(
            self.topics.function_state(fid), payload, retain=True, kind="state", key=f"state:{fid}"
        )

    def _enqueue(self, topic: str, payload: bytes, *, retain: bool, kind: str, key: str) -> None:
        try:
            self.store.outbox_put(topic, payload, qos=1, retain=retain, kind=kind, key=key)
        except OutboxFull as exc:
            log.error("outbox full, %s message for %s not queued: %s", kind, topic, exc)
            return
        except StoreError as exc:
            if not self._store_failed(exc, f"queueing the {kind} message for {topic}"):
                raise
            # Sent without the outbox; the store's rows are published again on recovery.
            if self._connected and self.mqtt is not None:
                self.mqtt.publish(topic, payload, qos=1, retain=retain)
            return
        self.outbox.drain()

    # -- invocations ------------------------------------------------------------------------

    def handle_invoke(self, msg: mqtt.Message) -> None:
        if self._stopping:
            return  # not acknowledged: the broker delivers it again after the restart
        try:
            request = protocol.decode_invoke(msg.payload, self.config.agent.max_payload_bytes)
        except protocol.InvokeDecodeError as exc:
            log.warning("bad invoke request: %s", exc, extra={"request_id": exc.request_id})
            address = self._reply_address(msg, exc.reply_to)
            target = (address.topic, msg.correlation_data)
            self._reply_error(exc.request_id, exc.function_id, [target], exc, durable=True)
            self._ack(msg)
            return
        address = self._reply_address(msg, request.reply_to)
        target = (address.topic, msg.correlation_data)
        rid = request.request_id
        if address.refused is not None:  # never publish into the contract: not run, not kept
            log.warning("invoke %s refused: %s", rid, address.refused, extra={"request_id": rid})
            refused = BadRequest(f"invoke: reply address refused: {address.refused}")
            self._reply_error(rid, request.function_id, [target], refused, durable=True)
            self._ack(msg)
            return
        running = self._inflight.get(rid)
        if running is not None:  # a duplicate while the first is still running
            if target not in running.targets:  # one reply per address, however many copies
                running.targets.append(target)
            if rid in self._accepted_rids:
                self._ack(msg)  # the first copy is on record: it will be answered
            else:
                running.acks.append(msg)
            return
        answered = self.store.dedupe_get(rid)
        if answered is not None and answered.ts < time.time() - self.config.agent.dedupe_window_s:
            answered = None  # older than the window: a new request (the prune is only tidying)
        if answered is not None:  # a duplicate of an answered request: no queue room taken
            if msg.dup:
                # The broker's redelivery (our PUBACK was lost: a restart, a dropped link).
                # The reply was durable before that PUBACK, so it was delivered or is still
                # queued: a second copy would only be a second reply.
                log.info("redelivered request %s: already answered", rid, extra={"request_id": rid})
                self._ack(msg)
                return
            log.info("duplicate request %s: resending its reply", rid, extra={"request_id": rid})
            self._send_reply(
                rid, answered.reply, [target], durable=True, remember=False, drain=False
            )
            self._ack(msg)  # before the reply goes out: see handle_invoke_done
            self.outbox.drain()
            return
        if not self.pool.has_function(request.function_id):
            missing = FunctionNotFound(f"Function not found: {request.function_id}")
            self._reply_error(rid, request.function_id, [target], missing, durable=True)
            self._ack(msg)
            return
        if not self.store.outbox_has_room(self.config.agent.max_payload_bytes):
            full = Overloaded("the outbox is full; retry when the agent has drained it")
            self._reply_error(rid, request.function_id, [target], full, durable=False)
            self._ack(msg)
            return
        invocation = _Invocation(request, [target], [msg])
        no_room, displaced = self._queue.offer(request.function_id, invocation)
        if no_room is not None:
            busy = Overloaded(no_room)
            self._reply_error(rid, request.function_id, [target], busy, durable=False)
            self._ack(msg)
            return
        self._inflight[rid] = invocation
        self._accept(invocation, msg)
        for other in displaced:  # its function held more than its share: this one is owed room
            self._refuse_displaced(other)
        self._start_ready()

    def _refuse_displaced(self, invocation: _Invocation) -> None:
        """A waiting invocation gave its place to another function's: answer overloaded."""
        request = invocation.request
        rid, fid = request.request_id, request.function_id
        self._inflight.pop(rid, None)
        held = self._queue.held(fid)
        busy = Overloaded(f"function {fid} holds {held} invocations, over its fair share")
        self._reply_error(rid, fid, invocation.targets, busy, durable=False)
        for msg in invocation.acks:
            self._ack(msg)
        if rid in self._accepted_rids:  # answered (overloaded): nothing to run after a restart
            self._accepted_rids.discard(rid)
            self._forget_accepted(rid)

    def _start_ready(self) -> None:
        """Hand every invocation the fair queue lets start to an executor thread."""
        for _fid, invocation in self._queue.ready():
            self._executor.submit(self._run_invocation, invocation)

    def _queue_limits(self) -> Limits:
        runtime = self.config.runtime
        return Limits(
            capacity=self._max_inflight(),
            max_queue=runtime.max_queue,
            threads=self._executor._max_workers,
            per_function=runtime.max_workers,
        )

    def _reply_address(self, msg: mqtt.Message, reply_to: str | None) -> protocol.ReplyAddress:
        mqtt_config = self.config.mqtt
        return self.topics.reply_address(
            msg.response_topic, reply_to, mqtt_config.reply_prefixes, mqtt_config.topic_charset
        )

    def _max_inflight(self) -> int:
        """Accepted and not yet answered, at most: every invocation thread busy plus a queue."""
        runtime = self.config.runtime
        return runtime.max_workers * 2 + runtime.max_queue

    def _run_invocation(self, invocation: _Invocation) -> None:
        """Executor thread: run it in a worker and post the outcome to the loop."""
        request = invocation.request
        try:
            result = self.pool.invoke(
                request.function_id,
                (request.payload,),
                request_id=request.request_id,
                # Read when the worker gets it, not now: it may wait for a worker first.
                context=self.sync.current,
                on_result=functools.partial(self._apply_state, invocation),
            )
            # The worker is free again; the reply waits until the state is on disk.
            if invocation.state_ticket:
                self.sync.persist(invocation.state_ticket)
                invocation.committed_reply = invocation.pending_reply
            elif result.accepts_context:
                self.sync.persist_through(result.state_version)
        except EdgeExecutionError as exc:
            self.post(_InvokeDone(invocation, None, exc))
        except Exception as exc:  # a bug must still answer the caller
            log.exception("invocation %s failed unexpectedly", request.request_id)
            self.post(_InvokeDone(invocation, None, EdgeExecutionError(str(exc))))
        else:
            self.post(_InvokeDone(invocation, result, None))

    def _apply_state(self, invocation: _Invocation, result: InvokeResult) -> None:
        """Invocation thread, worker still held: apply the write set (in memory) with its
        reply; it goes to disk once the worker is free (:meth:`StateSync.persist`).

        Applied while the worker is held, the function's next invocation (with
        ``concurrency`` 1) cannot start before it is in its context. Raises what fails the
        invocation instead (StateConflict, Overloaded, HandlerError); nothing is applied then.
        """
        if not result.changes:
            return
        request = invocation.request
        rid = request.request_id
        payload, error = self._ok_reply(request, result)
        if error is not None:
            raise error
        topic, correlation = invocation.targets[0]
        try:
            invocation.state_ticket = self.sync.apply(
                result.changes,
                ReplyRecord(rid, topic, payload, time.time(), correlation),
                base_version=result.state_version,
                checked=result.checked,
                read_all=result.read_all,
            )
        except (StateTooLarge, ValueError, TypeError) as exc:
            log.warning("state changes of %s refused: %s", rid, exc, extra={"request_id": rid})
            raise HandlerError(f"state change refused: {exc}") from exc
        invocation.pending_reply = payload

    def _ok_reply(
        self, request: protocol.InvokeRequest, result: InvokeResult
    ) -> tuple[bytes, EdgeExecutionError | None]:
        """The success reply's bytes, or the error that replaces it (too big, not JSON)."""
        rid, fid = request.request_id, request.function_id
        try:
            payload = protocol.encode_reply(
                rid,
                fid,
                ok=True,
                result=result.value,
                duration_ms=round(result.duration_ms, 3),
                cold_start=result.cold_start,
                node_id=self.config.node.id,
            )
        except (TypeError, ValueError) as exc:
            return b"", HandlerError(str(exc))
        limit = self.config.agent.max_payload_bytes
        if len(payload) > limit:  # a broker with max_packet_size would drop us for it
            return b"", HandlerError(
                f"the result of {fid} is {len(payload)} bytes as a reply, over "
                f"agent.max_payload_bytes ({limit})"
            )
        return payload, None

    def handle_invoke_done(self, done: _InvokeDone) -> None:
        invocation = done.invocation
        request = invocation.request
        rid, fid = request.request_id, request.function_id
        self._inflight.pop(rid, None)
        self._queue.finished(fid)
        self._start_ready()
        duration_ms = (time.monotonic() - invocation.started) * 1000
        error = done.error
        payload = b""
        if invocation.committed_reply is not None:
            payload = invocation.committed_reply  # queued and remembered with the state
        elif done.result is not None:
            payload, error = self._ok_reply(request, done.result)
        self.metrics.record(
            InvocationRecord(
                function_id=fid,
                node_id=self.config.node.id,
                start_time=time.time() - duration_ms / 1000,
                duration_ms=duration_ms,
                success=error is None,
                error="" if error is None else str(error),
                request_id=rid,
                cold_start=bool(done.result and done.result.cold_start),
                peak_rss_kb=done.result.rss_kb if done.result else 0,
                error_type=None if error is None else error_to_dict(error)["type"],
            )
        )
        if error is not None:
            log.info("%s failed: %s", fid, error, extra={"function_id": fid, "request_id": rid})
            payload = self._error_payload(rid, fid, error, duration_ms)
        targets = invocation.targets
        committed = invocation.committed_reply is not None
        if committed:
            targets = targets[1:]  # the first reply went into the outbox with the state
        # Remember the reply for duplicates only when the handler's outcome is final: a
        # request refused (overloaded, not deployed yet) or in conflict must run again
        # when it is retried with the same id.
        final = error is None or not isinstance(
            error, Overloaded | FunctionNotFound | StateConflict
        )
        if targets:
            remember = final and not committed
            self._send_reply(rid, payload, targets, durable=True, remember=remember, drain=False)
        # Acknowledge once the reply is durable but before it is published: a broker that
        # drops the connection over the reply (a poison message) must not also redeliver
        # the request, or every reconnect would queue its reply once more.
        for msg in invocation.acks:
            self._ack(msg)
        if rid in self._accepted_rids:  # the reply is durable now: the record may go
            self._accepted_rids.discard(rid)
            self._forget_accepted(rid)
        self.outbox.drain()

    def _accept(self, invocation: _Invocation, msg: mqtt.Message) -> None:
        """Record an accepted invoke durably, then acknowledge it to the broker at once.

        Brokers with an ack deadline (NATS: ``ack_wait``, 30 s by default) deliver again
        what stays unacknowledged that long, even while it runs; once it is on record here
        an agent that crashes runs it again at start (:meth:`_recover_accepted`), so the
        request is answered either way. A record that cannot be written leaves the ack for
        the answer, as before.
        """
        rid = invocation.request.request_id
        if msg.qos == 0:  # nothing to acknowledge (a recovered request is on record already)
            return
        try:
            record = AcceptedInvoke(
                rid, msg.payload, msg.response_topic, msg.correlation_data, time.time()
            )
            self.accepted.put(record)
        except StoreError as exc:  # a failing store: degraded, and acknowledged once answered
            if not self._store_failed(exc, f"recording the accepted invoke {rid}"):
                log.error(
                    "cannot record accepted invoke %s: %s", rid, exc, extra={"request_id": rid}
                )
            return
        self._accepted_rids.add(rid)
        for pending in invocation.acks:
            self._ack(pending)
        invocation.acks.clear()

    def _forget_accepted(self, rid: str) -> None:
        try:
            self.accepted.done(rid)
        except StoreError as exc:  # it would run again after a restart: a duplicate reply
            if self._store_failed(exc, f"clearing the accepted invoke {rid}"):
                self._uncleared_accepted.add(rid)  # cleared once the store recovers
                return
            log.error("cannot clear accepted invoke %s: %s", rid, exc, extra={"request_id": rid})

    def _recover_accepted(self) -> None:
        """At the first connect: handle again what a previous run accepted and left
        unanswered (it crashed or was killed); a request already answered only loses its
        record (its reply is in the outbox)."""
        self._recovered = True
        try:
            pending = self.accepted.pending()
        except StoreError as exc:
            log.error("cannot read accepted invokes: %s", exc)
            return
        for record in pending:
            rid = record.request_id
            if rid in self._inflight:
                continue
            if self.store.dedupe_get(rid) is not None:
                self._forget_accepted(rid)
                continue
            log.info("running again %s, accepted before a restart", rid, extra={"request_id": rid})
            self._accepted_rids.add(rid)
            self.handle_invoke(
                mqtt.Message(
                    topic=self.topics.invoke,
                    payload=record.payload,
                    qos=0,
                    retain=False,
                    mid=0,
                    response_topic=record.response_topic,
                    correlation_data=record.correlation,
                )
            )
            if rid not in self._inflight:  # answered at once (not deployed, refused, ...)
                self._accepted_rids.discard(rid)
                self._forget_accepted(rid)

    def _error_payload(
        self, rid: str | None, fid: str | None, error: BaseException, duration_ms: float = 0.0
    ) -> bytes:
        return protocol.encode_reply(
            rid,
            fid,
            ok=False,
            error=error_to_dict(error),
            duration_ms=round(duration_ms, 3),
            cold_start=False,
            node_id=self.config.node.id,
        )

    def _reply_error(
        self,
        rid: str | None,
        fid: str | None,
        targets: list[tuple[str, bytes | None]],
        error: BaseException,
        *,
        durable: bool,
    ) -> None:
        payload = self._error_payload(rid, fid, error)
        self._send_reply(rid, payload, targets, durable=durable, remember=False)

    def _send_reply(
        self,
        rid: str | None,
        payload: bytes,
        targets: list[tuple[str, bytes | None]],
        *,
        durable: bool,
        remember: bool,
        drain: bool = True,
    ) -> None:
        """Queue a reply per target in the outbox (the first also remembered for dedupe)."""
        now = time.time()
        for index, (topic, correlation) in enumerate(targets):
            if durable:
                try:
                    if remember and index == 0 and rid is not None:
                        self.store.record_reply(
                            rid, topic, payload, ts=now, correlation=correlation
                        )
                    else:
                        self.store.outbox_put(
                            topic, payload, kind="reply", ts=now, correlation=correlation
                        )
                    continue
                except OutboxFull as exc:
                    log.error("outbox full for the reply to %s: %s", rid, exc)
                except StoreError as exc:  # answered all the same, without the outbox
                    if not self._store_failed(exc, f"queueing the reply to {rid}"):
                        raise
            if self._connected and self.mqtt is not None:
                self.mqtt.publish(topic, payload, qos=1, correlation_data=correlation)
            else:
                log.error(
                    "reply to %s LOST: outbox full and broker unreachable",
                    rid,
                    extra={"request_id": rid},
                )
        if drain:
            self.outbox.drain()

    # -- a failing store (issue 12): a state, never silence ----------------------------------

    def _store_failed(self, exc: StoreError, doing: str) -> bool:
        """Note a fault of the store (disk full, I/O error): "degraded" with the reason
        until a probe on the store_retry timer writes again. Callers then carry on without
        the store (a reply published directly, a spec kept in memory). False when ``exc``
        is no fault of the store (OutboxFull and the other bounded refusals)."""
        kind = store_fault(exc)
        if kind is None:
            return False
        first = self._store_fault is None
        self._store_fault = f"store: {kind}: {exc}"
        if "store_retry" not in self._timers:
            self._timers["store_retry"] = time.monotonic() + STORE_RETRY_S
        if not first:
            log.debug("state store still failing (%s): %s", doing, exc)
            return True
        self._store_fault_since = time.monotonic()
        log.error(
            "degraded: the state store failed while %s (%s): %s; replies go out without the "
            "outbox until it takes writes again (probed every %gs)",
            doing,
            kind,
            exc,
            STORE_RETRY_S,
        )
        if self._connected and self.mqtt is not None:
            self._publish_status("online")  # "degraded", with the reason
        return True

    def _salvage(self, repaired: dict[str, Any]) -> None:
        """After a repair: serve again what the damaged file still proves (signed specs whose
        code on disk matches), until the retained specs arrive; recorded in the repair."""
        kept = self.deployments.salvage(salvage_deployments(repaired["moved_to"]))
        repaired["restored"] = kept
        self.store.set_meta("store_repaired", json.dumps(repaired, sort_keys=True))
        if kept:
            log.warning(
                "restored %d signed functions from the damaged state database: %s",
                len(kept),
                ", ".join(kept),
            )

    def _refuse_on_store_fault(self, msg: mqtt.Message) -> None:
        """An invoke the store failed under before it was taken: answer overloaded now."""
        try:
            request = protocol.decode_invoke(msg.payload, self.config.agent.max_payload_bytes)
        except protocol.InvokeDecodeError:
            self._ack(msg)
            return
        rid = request.request_id
        if rid in self._inflight:
            return  # taken: it is answered (and acknowledged) when it is done
        address = self._reply_address(msg, request.reply_to)
        busy = Overloaded(f"the agent's state store is failing ({self._store_fault}); retry later")
        target = (address.topic, msg.correlation_data)
        self._reply_error(rid, request.function_id, [target], busy, durable=False)
        self._ack(msg)

    def _retry_store(self) -> None:
        """The store_retry timer: back online once the store takes a write again."""
        problem = self.store.probe()
        if problem is not None:
            self._timers["store_retry"] = time.monotonic() + STORE_RETRY_S
            log.debug("state store still failing: %s", problem)
            return
        self._timers.pop("store_retry", None)
        took = time.monotonic() - self._store_fault_since
        self._store_fault = None
        log.warning("the state store takes writes again after %.1fs: catching up", took)
        deferred, self._deferred_specs = self._deferred_specs, {}
        for topic, (kind, fid, payload) in deferred.items():
            try:
                self._on_spec(kind, fid, payload)
            except StoreError as exc:
                self._deferred_specs[topic] = (kind, fid, payload)
                if not self._store_failed(exc, f"storing the spec on {topic}"):
                    raise
        uncleared, self._uncleared_accepted = self._uncleared_accepted, set()
        for rid in sorted(uncleared):  # answered: must not run again after a restart
            self._forget_accepted(rid)
        # Outcomes and states that could not be written: deploy again what the rows do not
        # say is deployed, and publish every function's state from the rows.
        self.deployments.reconcile_all()
        self._republish_states()
        self._timers["outbox_sweep"] = time.monotonic()
        if self._store_fault is None:
            log.info("state store recovered: online")
        if self._connected and self.mqtt is not None:
            self._publish_status("online")
        self.outbox.drain()

    def _sweep_outbox(self) -> None:
        """Delete outbox rows the broker acknowledged while their delete failed (a full disk).

        Once nothing is in flight or awaiting a retry, every row at or below the last id
        handed to MQTT was acknowledged (or refused and not moved to the dead letters):
        without this they would sit in the outbox until the next restart sent them again.
        """
        if self._store_fault is not None:
            return  # the next recovery schedules the sweep again
        if self.outbox.in_flight or self.outbox.awaiting_retry or self.outbox.holding:
            # (a held delta is at or below last_sent_id and was never sent: wait for it)
            self._timers["outbox_sweep"] = time.monotonic() + 1.0
            return
        self._timers.pop("outbox_sweep", None)
        last = self.outbox.last_sent_id
        stuck = [item.id for item in self.store.outbox_peek(10_000) if item.id <= last]
        for item_id in stuck:
            self.store.outbox_ack(item_id)
        if stuck:
            log.warning(
                "deleted %d outbox messages the broker had acknowledged while the store failed",
                len(stuck),
            )
        self._update_status_line()

    def _republish_states(self) -> int:
        """Queue every function's retained state again, from the store's deployment rows
        (a new broker session, or a store that could not queue them); how many."""
        rows = self.store.list_deployments()
        for row in rows:
            error = json.loads(row.error_json) if row.error_json else None
            self._report_state(
                row.function_id, row.version, row.sha256, row.state, error, row.active_version
            )
        return len(rows)

    def _degraded_reasons(self) -> list[str]:
        """Every reason this node is degraded: the store's fault first, then the others."""
        reasons = [self._store_fault] if self._store_fault else []
        try:
            others = self._degraded()
        except StoreError:  # dead letters cannot be counted while the store fails
            others = []
        return reasons + others

    # -- timers -----------------------------------------------------------------------------

    def _next_timer_in(self) -> float:
        if not self._timers:
            return 1.0
        return max(0.0, min(self._timers.values()) - time.monotonic())

    def _run_timers(self) -> None:
        now = time.monotonic()
        if self._timers.get("heartbeat", now + 1) <= now:
            self._timers["heartbeat"] = now + self.config.agent.heartbeat_interval_s
            self._send_heartbeat()
            if self._connected and self._heartbeat_seq % STATUS_REFRESH_HEARTBEATS == 0:
                self._publish_status("online")  # a fresh ts: "last seen" for one-shot views
        if self._timers.get("watchdog", now + 1) <= now:
            interval = self.notifier.watchdog_interval() or 1.0
            self._timers["watchdog"] = now + interval
            self.notifier.watchdog()  # from the loop only: a stuck loop stops the pings
        if self._timers.get("store_retry", now + 1) <= now:
            self._retry_store()
        if self._timers.get("rollcall", now + 1) <= now:
            del self._timers["rollcall"]
            self._rollcall_budget.spend(now)
            if self._connected:  # answered live: a controller cannot read retained ones
                self._publish_status("online")
                self._republish_states()
        if self._timers.get("outbox_sweep", now + 1) <= now:
            self._sweep_outbox()
        if self._timers.get("prune", now + 1) <= now:
            self._timers["prune"] = now + 60.0
            self.store.dedupe_prune(time.time() - self.config.agent.dedupe_window_s)
        if self._timers.get("dead_letters", now) <= now:  # cleared or retried by the CLI?
            self._timers["dead_letters"] = now + 2.0
            self._refresh_dead_letters()
        # Refused outbox items waiting out their backoff (none while disconnected).
        if self._timers.get("outbox_retry", now + 1) <= now:
            self.outbox.retry_due()
        retry_at = self.outbox.next_retry_at()
        if retry_at is None:
            self._timers.pop("outbox_retry", None)
        else:
            self._timers["outbox_retry"] = retry_at

    def _send_heartbeat(self) -> None:
        if not self._connected or self.mqtt is None:
            return
        self._heartbeat_seq += 1
        functions = []
        try:
            rows = self.store.list_deployments()
        except StoreError as exc:  # heartbeats go on (degraded) while the store cannot be read
            if not self._store_failed(exc, "reading deployments for a heartbeat"):
                raise
            rows = []
        for row in rows:
            stats = self.metrics.function_stats(row.function_id)
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
                    "limits": self.pool.limits_mode(row.function_id),
                }
            )
        count, nbytes = self.store.outbox_depth()
        degraded = self._degraded_reasons()
        payload = protocol.encode_heartbeat(
            self.config.node.id,
            self._heartbeat_seq,
            round(time.monotonic() - self._started, 3),
            "degraded" if degraded else "online",
            system_metrics(self.config.agent.state_dir),
            functions,
            extra={
                "outbox": {"messages": count, "bytes": nbytes},
                "dead_letters": self._dead_letters or 0,
                **({"degraded": degraded} if degraded else {}),
                "inflight": len(self._inflight),
                "sync": self.sync.summary(),
                "trust": self.deployments.trust_mode,
                "isolation": self.identities.isolation.mode,
                # Lets a controller judge staleness without knowing this node's config.
                "interval_s": self.config.agent.heartbeat_interval_s,
            },
        )
        self.mqtt.publish(self.topics.heartbeat, payload, qos=0)

    def _update_status_line(self) -> None:
        count, _ = self.store.outbox_depth()
        self.notifier.status(
            f"{'connected' if self._connected else 'disconnected'}, "
            f"{len(self.pool.functions())} functions, outbox {count}"
        )

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
            new = load_config(self.config_path)
            trust = TrustPolicy.from_files(
                new.trust.keys,
                require_signed=new.trust.require_signed,
                node_id=self.config.node.id,
            )
        except AgentError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self.notifier.ready()
            return
        old = self.config
        # What runs keeps these until a restart: the identity, the connection, the files,
        # and the uid workers are spawned with.
        running = replace(
            new,
            node=old.node,
            mqtt=old.mqtt,
            agent=replace(
                new.agent, state_dir=old.agent.state_dir, durability=old.agent.durability
            ),
            runtime=replace(new.runtime, worker_user=old.runtime.worker_user),
        )
        restart_needed = [key for key, (a, b) in _changed_keys(new, running).items() if a != b]
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
        self.deployments.set_trust(trust)  # a removed key is revoked now
        self.config = running
        if self._connected:
            self._publish_status("online")  # its retained "trust" may have changed
        if self._timers.get("heartbeat"):
            self._timers["heartbeat"] = time.monotonic() + new.agent.heartbeat_interval_s
        log.info("reloaded %s", self.config_path)
        if restart_needed:
            log.warning("changes to %s take effect after a restart", ", ".join(restart_needed))
        self.notifier.ready()


def _changed_keys(new: Config, running: Config) -> dict[str, tuple[object, object]]:
    """``section.key`` -> (in the file, running) for every key; callers keep the differing."""
    out: dict[str, tuple[object, object]] = {}
    for section in ("node", "mqtt", "agent", "runtime", "outbox"):
        a, b = getattr(new, section), getattr(running, section)
        for name in a.__dataclass_fields__:
            out[f"{section}.{name}"] = (getattr(a, name), getattr(b, name))
    return out
