"""``FleetController``: one MQTT connection that watches the fleet and acts on it.

Owns the controller's connection (an :class:`~agent.mqtt.MqttClient`), the
:class:`~agent.cloud.view.FleetView` it keeps current, and the cloud side's operations:
publishing specs (fleet-wide or per node), waiting for rollouts, canary-first rollouts with
rollback, and invocations over MQTT request/response. It is the composition of its parts,
each in its own module and all sharing one :class:`~agent.cloud.link.ControllerLink` (the
lock, the view, the clock, the acknowledged publish)::

    controller.py  FleetController: construction, the connection, the retained-replay fence
                   and the wildcard probe, the ingest thread, reading the view; the rest of
                   its public methods hand over to the parts below
    publishing.py  SpecPublisher: specs, clears, spec indexes, forgetting a node
    deploy.py      Rollouts: wait_rollout (with the canary repush), staged rollout, rollback
    invoke.py      Invocations: request/response, re-asking late replies; RemoteResult
    link.py        ControllerLink: the shared state, publish with PUBACK and resend

Threads::

    paho network thread (agent.mqtt)   callbacks only convert and enqueue MqttEvents
    fleet-ingest thread (this module)  the only writer of the view: drains the queue in
                                       batches under one lock, then wakes the waiters
    callers' threads                   read the view under the lock, publish through the
                                       MqttClient (thread-safe), wait with deadlines

Start-up is a barrier, not a guess: after the broker acknowledges the connection (and with
it our subscriptions, which paho sends first), the controller publishes a *fence* message to
its own topic. The broker queues retained messages for a subscription before it routes a
later publish on the same connection, so when the fence comes back every retained status,
function state and spec has been ingested (:class:`agent.contract.fence.ReplayFence`, which the sync
mirror uses too).

Deadlines and waits use ``time.monotonic``; node staleness uses the injectable ``clock``.

Must never: import paho (only agent.mqtt does), block or decide anything in a paho
callback, or hold the lock while calling user code (progress callbacks run unlocked).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from agent.cloud.deploy import Progress, Rollouts
from agent.cloud.invoke import Invocations, RemoteResult
from agent.cloud.link import ControllerLink
from agent.cloud.probe import WildcardProbe
from agent.cloud.publishing import SpecPublisher
from agent.cloud.rollout import RolloutReport, StagedRollout
from agent.cloud.view import FleetView
from agent.contract import protocol
from agent.contract.fence import ReplayFence

# Defined with the whole tree in agent.errors; raised here, and importable from here.
from agent.errors import BrokerUnreachable as BrokerUnreachable
from agent.errors import PublishRefused as PublishRefused
from agent.errors import ReplyTimeout as ReplyTimeout
from agent.models import EdgeNode, EdgeNodeStatus
from agent.mqtt import (
    Connected,
    ConnectFailed,
    Disconnected,
    Message,
    MqttClient,
    MqttEvent,
    MqttSettings,
    Published,
)
from agent.trust import Signer

log = logging.getLogger(__name__)

__all__ = [
    "BrokerUnreachable",
    "FleetController",
    "Progress",
    "PublishRefused",
    "RemoteResult",
    "ReplyTimeout",
]

#: Events handled per lock acquisition by the ingest thread.
_BATCH = 512
#: A roll call's answers are awaited this much longer than its window (transit, queues).
ROLLCALL_MARGIN_S = 0.5


class _Stop:
    pass


class FleetController:
    """The cloud side of the wire contract. Construction touches nothing; ``start()`` connects.

    ``extra_subscriptions`` adds topic filters to the one connection; messages on them that
    the view does not know go to ``on_message(topic, payload)``, which runs on the ingest
    thread with the lock held: it must only update state and ``publish_nowait`` (the sync
    mirror of ``edgectl state`` is fed this way).
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        prefix: str = "edge",
        heartbeat_interval_s: float = 30.0,
        invoke_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        extra_subscriptions: Iterable[str] = (),
        on_message: Callable[[str, bytes], None] | None = None,
        mqtt_factory: Callable[..., MqttClient] = MqttClient,
        signer: Signer | None = None,
        view_qos: int = 1,
        reply_qos: int = 1,
        retained_wildcards: str = "auto",
        rollcall_window_s: float = 2.0,
    ) -> None:
        self.controller_id = f"ctl-{uuid.uuid4().hex[:12]}"
        if not settings.client_id:
            settings = replace(settings, client_id=self.controller_id)
        self.settings = settings
        self.view = FleetView(prefix, heartbeat_interval_s=heartbeat_interval_s)
        self.prefix = prefix
        self.invoke_timeout_s = invoke_timeout_s
        base = f"{prefix}/controllers/{self.controller_id}"
        self.reply_topic = f"{base}/replies"
        #: The retained-replay fence (agent.contract.fence); wait_synced() waits for it to pass.
        self._fence = ReplayFence(f"{base}/fence")
        own = [self.reply_topic, self._fence.topic]
        #: Brokers without retained wildcards (docs/protocol.md): "yes", "no" or "auto"
        #: (probe at start); ``wildcard_replay`` says what start() found.
        if retained_wildcards not in protocol.RETAINED_WILDCARDS:
            raise ValueError(
                f"retained_wildcards: expected auto, yes or no, not {retained_wildcards}"
            )
        self.wildcard_replay: bool | None = None
        self.rollcall_window_s = rollcall_window_s
        if retained_wildcards != "yes":  # exact topics: replayed by every broker
            own += [self.view.topics.fleet_index, self.view.topics.node_catalog]
        self._subscriptions = [*self.view.subscriptions(), *own, *extra_subscriptions]
        #: QoS 0 for the view's filters (and the fence) suits a one-shot reader (edgectl):
        #: the retained replay is what it needs and nothing is queued for a clean session
        #: anyway, while on a NATS cluster each QoS 1 filter is a replicated JetStream
        #: consumer, slow to create and impossible while the cluster elects stream leaders.
        self._subscription_qos = {t: view_qos for t in [*self.view.subscriptions(), *own]}
        self._subscription_qos[self.reply_topic] = reply_qos
        self._on_message = on_message
        self._clock = clock
        self._mqtt_factory = mqtt_factory
        self._thread: threading.Thread | None = None
        self._events: queue.SimpleQueue[MqttEvent | _Stop] = queue.SimpleQueue()
        self._last_failure: str | None = None
        # The parts, composed over one link (see the module docstring).
        self._link = ControllerLink(self.view, clock)
        #: The lock the ingest thread holds while it applies a batch (the link's).
        self._cond = self._link.cond
        self.stats: Counter[str] = self._link.stats
        self._specs = SpecPublisher(
            self._link, signer=signer, retained_wildcards=retained_wildcards
        )
        self._rollouts = Rollouts(self._link, self._specs)
        self._probe = WildcardProbe(self._link, base)
        self._invocations = Invocations(
            self._link,
            controller_id=self.controller_id,
            reply_topic=self.reply_topic,
            node=self.node,
        )

    @property
    def signer(self) -> Signer | None:
        """Signs every spec this controller publishes (deploys, canaries, rollbacks)."""
        return self._specs.signer

    @signer.setter
    def signer(self, signer: Signer | None) -> None:
        self._specs.signer = signer

    @property
    def retained_wildcards(self) -> str:
        """The mode as constructed: yes, no or auto (spec indexes are written unless yes)."""
        return self._specs.retained_wildcards

    @retained_wildcards.setter
    def retained_wildcards(self, mode: str) -> None:
        self._specs.retained_wildcards = mode

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect and ingest every retained message; BrokerUnreachable after ``timeout``."""
        if self._link.mqtt is not None:
            return
        self._thread = threading.Thread(target=self._ingest, name="fleet-ingest", daemon=True)
        self._thread.start()
        kwargs: dict[str, Any] = {}
        if any(qos != 1 for qos in self._subscription_qos.values()):
            kwargs["subscription_qos"] = self._subscription_qos
        self._link.mqtt = self._mqtt_factory(
            self.settings,
            self._events.put,
            subscriptions=self._subscriptions,
            manual_ack=False,
            **kwargs,
        )
        try:
            self._link.mqtt.start()
        except BaseException:
            self.close()
            raise
        if not self.wait_synced(timeout):
            client = self._link.mqtt
            with self._cond:
                reason = self._last_failure
            if client is not None and client.connected:
                host, port = client.broker
                reason = (
                    f"connected to {host}:{port}, but its retained messages did not all "
                    "arrive (the fence did not come back)"
                )
            self.close()
            where = self.settings.describe()
            raise BrokerUnreachable(
                f"cannot reach the MQTT broker at {where} within {timeout:g}s: "
                f"{reason or 'no broker answered the CONNECT'}"
            )
        try:
            self._settle_retained_mode(timeout)
        except BaseException:
            self.close()
            raise

    def _settle_retained_mode(self, timeout: float) -> None:
        """Does the broker replay retained messages to wildcard filters (``auto``: probe)?
        Without, read the specs the indexes list on their exact topics and call the roll:
        statuses and function states arrive live, as answers."""
        mode = self.retained_wildcards
        replay = mode == "yes" or (mode == "auto" and self.probe_retained_wildcards(timeout))
        self.wildcard_replay = replay
        if replay:
            return
        log.info(
            "fleet controller: exact-topic mode (the broker does not replay retained "
            "messages to wildcard subscriptions): spec indexes and a roll call"
        )
        with self._cond:
            topics = [self.spec_topic(fid) for fid in self.view.fleet_index]
            topics += [
                self.spec_topic(fid, node_id)
                for node_id, functions in self.view.node_index.items()
                for fid in functions
            ]
        client = self._link.mqtt
        if topics and client is not None:
            client.subscribe(topics, qos=self._subscription_qos[self._fence.topic])
            with self._cond:
                self._fence.reset()
                client.publish(self._fence.topic, self._fence.arm(), qos=1)
            if not self.wait_synced(timeout):
                raise BrokerUnreachable(
                    f"the {len(topics)} specs the indexes list did not arrive within {timeout:g}s"
                )
        self.rollcall()

    def probe_retained_wildcards(self, timeout: float = 10.0) -> bool:
        """True when the broker replays a retained message to a wildcard subscription; no
        answer within ``timeout``: False (see :meth:`WildcardProbe.run`)."""
        return self._probe.run(timeout, self._subscription_qos[self._fence.topic])

    def rollcall(self, window_s: float | None = None) -> None:
        """Ask every agent to publish its status and function states again, live, at a
        random moment within ``window_s`` (default ``rollcall_window_s``), and wait for the
        window to pass: how a view fills on a broker that replays no retained statuses to
        wildcards. N nodes answer at about N / window statuses per second."""
        window = self.rollcall_window_s if window_s is None else window_s
        rid = f"{self.controller_id}-rollcall-{next(self._link.request_ids):x}"
        self.publish(self.view.topics.rollcall, protocol.encode_rollcall(rid, window))
        deadline = time.monotonic() + window + ROLLCALL_MARGIN_S
        stop = threading.Event()  # answers are ingested meanwhile; nothing to wake us for
        while (remaining := deadline - time.monotonic()) > 0:
            stop.wait(remaining)

    def wait_synced(self, timeout: float) -> bool:
        """True once connected and every retained message up to now has been ingested."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._fence.passed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        """Disconnect and stop the ingest thread; idempotent."""
        client, self._link.mqtt = self._link.mqtt, None
        if client is not None:
            client.stop()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._events.put(_Stop())
            thread.join(5)
        with self._cond:
            self._invocations.cancel_all()

    def __enter__(self) -> FleetController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._link.mqtt is not None and self._link.mqtt.connected

    # -- the ingest thread -------------------------------------------------------------------

    def _ingest(self) -> None:
        while True:
            batch: list[MqttEvent | _Stop] = [self._events.get()]
            try:
                while len(batch) < _BATCH:
                    batch.append(self._events.get_nowait())
            except queue.Empty:
                pass
            now, wall = self._clock(), time.time()
            changed = False
            with self._cond:
                for event in batch:
                    if isinstance(event, _Stop):
                        self._cond.notify_all()
                        return
                    try:
                        changed |= self._handle(event, now, wall)
                    except Exception:  # one bad event never stops the ingest thread
                        log.exception("fleet controller: bug handling %s", type(event).__name__)
                self._cond.notify_all()
                if changed:
                    for watcher in self._link.watchers:
                        watcher.set()

    def _handle(self, event: MqttEvent, now: float, wall: float) -> bool:
        """Apply one event (lock held); True when a rollout's results may have changed."""
        if isinstance(event, Message):
            return self._handle_message(event, now, wall)
        if isinstance(event, Published):
            if event.mid in self._link.acks:
                self._link.acks[event.mid] = event
        elif isinstance(event, Connected):
            self._last_failure = None
            assert self._link.mqtt is not None
            self._link.mqtt.publish(self._fence.topic, self._fence.arm(), qos=1)
        elif isinstance(event, ConnectFailed | Disconnected):
            self._fence.reset()
            self._last_failure = event.reason
            log.info("fleet controller: broker connection: %s", event.reason)
        return True

    def _handle_message(self, msg: Message, now: float, wall: float) -> bool:
        self.stats["messages"] += 1
        if msg.topic == self.reply_topic:
            self._handle_reply(msg)
            return False
        if self._fence.on_message(msg.topic, msg.payload):
            return False
        if self._probe.on_message(msg):
            return False
        if self._specs.own_echo(msg.topic, msg.payload):  # our own write is newer
            return False
        kind = self.view.ingest(msg.topic, msg.payload, now=now, retained=msg.retain, wall=wall)
        if kind == "bad":
            log.debug("fleet controller: ignored %s", self.view.last_error)
        elif kind == "unknown" and self._on_message is not None:
            self._on_message(msg.topic, msg.payload)
        return kind in ("status", "function_state")

    # -- reading the fleet -------------------------------------------------------------------

    def nodes(self, status: EdgeNodeStatus | None = None) -> list[EdgeNode]:
        with self._cond:
            return self.view.nodes(self._clock(), status)

    def node(self, node_id: str) -> EdgeNode | None:
        return self._link.node(node_id)

    def heartbeat(self, node_id: str) -> None:
        with self._cond:
            self.view.mark_heartbeat(node_id, self._clock())

    def function_states(self, node_id: str) -> dict[str, dict[str, Any]]:
        """The node's retained function states, by function id (copies)."""
        with self._cond:
            return {fid: dict(m) for fid, m in self.view.states.get(node_id, {}).items()}

    def active_functions(self, node_id: str) -> list[str]:
        with self._cond:
            return self.view.active_functions(node_id)

    def targets(self, spec: protocol.FunctionSpec) -> list[str]:
        """Nodes that would deploy ``spec`` from the fleet topic now (not offline, requires)."""
        return self._specs.targets(spec)

    # -- publishing (agent.cloud.publishing, agent.cloud.link) --------------------------------

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 30.0
    ) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK: BrokerUnreachable if none comes,
        PublishRefused if it carries a failure reason (see :meth:`ControllerLink.publish`)."""
        self._link.publish(topic, payload, retain=retain, timeout=timeout)

    def publish_nowait(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Hand a QoS 1 message to the connection without waiting for the broker (safe from
        ``on_message``, which runs on the ingest thread)."""
        self._link.publish_nowait(topic, payload, retain=retain)

    def spec_topic(self, function_id: str, node_id: str | None = None) -> str:
        return self._specs.spec_topic(function_id, node_id)

    def publish_spec(self, spec: protocol.FunctionSpec, node_id: str | None = None) -> None:
        """Publish ``spec`` retained, fleet-wide (``node_id`` None) or for one node; signed
        for that target with a new sequence when the controller has a signer. Then the
        spec index (see :meth:`update_indexes`)."""
        self._specs.publish_spec(spec, node_id)

    def next_sequence(self, spec: protocol.FunctionSpec) -> int:
        """A sequence above every one this controller used and every retained spec of the
        function shows (see :meth:`SpecPublisher.next_sequence`)."""
        return self._specs.next_sequence(spec)

    def clear_spec(self, function_id: str, node_id: str | None = None) -> bool:
        """Clear the retained spec (nodes remove the function, or fall back to the fleet
        spec); True when there was one."""
        return self._specs.clear_spec(function_id, node_id)

    def update_indexes(self, changes: Iterable[tuple[str | None, str, str | None]]) -> None:
        """Bring the retained spec indexes up to date after specs were published, each
        ``(node id or None for the fleet, function id, version or None when cleared)``."""
        self._specs.update_indexes(changes)

    def deploy_fleet(self, spec: protocol.FunctionSpec) -> list[str]:
        """Publish the fleet spec; the nodes that will deploy it now (the rollout's targets)."""
        return self._specs.deploy_fleet(spec)

    def deploy_nodes(self, spec: protocol.FunctionSpec, node_ids: Iterable[str]) -> list[str]:
        """Publish a per-node spec to each node; the nodes."""
        return self._specs.deploy_nodes(spec, node_ids)

    def forget_node(self, node_id: str) -> bool:
        """Clear a decommissioned node's retained status and function states."""
        return self._specs.forget_node(node_id)

    # -- rollouts (agent.cloud.deploy) -------------------------------------------------------

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
        for ``spec``, or the deadline (see :meth:`Rollouts.wait_rollout`)."""
        return self._rollouts.wait_rollout(
            spec, nodes, timeout, on_progress, phase=phase, repush=repush
        )

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
        return self._rollouts.staged_rollout(
            spec,
            canary=canary,
            max_failures=max_failures,
            canary_timeout_s=canary_timeout_s,
            timeout_s=timeout_s,
            on_progress=on_progress,
        )

    # -- invocations (agent.cloud.invoke) ----------------------------------------------------

    def invoke(
        self, node_id: str, function_id: str, payload: Any = None, *, timeout: float | None = None
    ) -> RemoteResult:
        """Invoke a function on a node; its value, or the error class the node named.

        A reply that does not come within ``timeout`` (default ``invoke_timeout_s``) raises
        :class:`ReplyTimeout`, a ``FunctionTimeout``.
        """
        timeout = self.invoke_timeout_s if timeout is None else timeout
        return self._invocations.invoke(node_id, function_id, payload, timeout=timeout)

    def _handle_reply(self, msg: Message) -> None:
        """A message on the reply topic (ingest thread, lock held)."""
        self._invocations.on_reply(msg)
