"""``FleetController``: one MQTT connection that watches the fleet and acts on it.

Owns the controller's connection (an :class:`~agent.mqtt.MqttClient`), the
:class:`~agent.cloud.view.FleetView` it keeps current, and the cloud side's operations:
publishing specs (fleet-wide or per node), waiting for rollouts, canary-first rollouts with
rollback, and invocations over MQTT request/response.

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

Replies: invocations carry ``reply_to = <p>/controllers/<controller id>/replies`` and MQTT 5
Correlation Data (the request id); the agent echoes the correlation data on the reply, and
the request id in its body serves MQTT 3.1.1. (``MqttClient.publish`` cannot set the MQTT 5
Response Topic property yet, so the topic travels in the body's ``reply_to``.)

Deadlines and waits use ``time.monotonic``; node staleness uses the injectable ``clock``.

Must never: import paho (only agent.mqtt does), block or decide anything in a paho
callback, or hold the lock while calling user code (progress callbacks run unlocked).
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import Any

from agent.cloud import rollout
from agent.cloud.rollout import RolloutReport, StagedRollout
from agent.cloud.view import FleetView
from agent.contract import protocol
from agent.contract.fence import ReplayFence
from agent.errors import (
    AgentError,
    BadRequest,
    DeploymentRejected,
    error_from_dict,
)

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

Progress = Callable[[str, RolloutReport], None]

#: Events handled per lock acquisition by the ingest thread.
_BATCH = 512
#: An invoke or spec the broker has not acknowledged after this long is published again.
INVOKE_RESEND_S = 3.0
#: A roll call's answers are awaited this much longer than its window (transit, queues).
ROLLCALL_MARGIN_S = 0.5
#: An acknowledged invoke without a reply after this long is asked again (same request id;
#: the agent answers a duplicate from its dedupe table, or takes it as already running),
#: then after twice that, up to :data:`REPLY_REASK_MAX_S` between two asks.
REPLY_REASK_S = 5.0
REPLY_REASK_MAX_S = 20.0
#: A canary without a result after this long gets its per-node spec again (then after
#: twice that, and so on): see :meth:`FleetController.wait_rollout`.
REPUSH_S = 10.0


@dataclass(frozen=True)
class RemoteResult:
    """A remote invocation's reply: the handler's value and what the node said about it."""

    value: Any
    node_id: str
    request_id: str
    duration_ms: float
    cold_start: bool
    round_trip_ms: float


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
        #: Signs every spec this controller publishes (deploys, canaries, rollbacks).
        self.signer = signer
        self._last_sequence = 0
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
        self.retained_wildcards = retained_wildcards
        self.wildcard_replay: bool | None = None
        self.rollcall_window_s = rollcall_window_s
        self._probe_topic, self._probe_fence = f"{base}/probe/r", f"{base}/probe/f"
        self._probe_nonce = b""
        self._probe_result: bool | None = None
        #: Index topic -> the payload this controller published last, until it comes back.
        self._index_sent: dict[str, bytes] = {}
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
        self._mqtt: MqttClient | None = None
        self._thread: threading.Thread | None = None
        self._events: queue.SimpleQueue[MqttEvent | _Stop] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._pending: dict[str, Future[dict[str, Any]]] = {}
        #: mid -> its PUBACK (None until it arrives), for publish() to wait on.
        self._acks: dict[int, Published | None] = {}
        self._watchers: set[threading.Event] = set()
        self._request_ids = itertools.count(1)
        self._last_failure: str | None = None
        self.stats: Counter[str] = Counter()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Connect and ingest every retained message; BrokerUnreachable after ``timeout``."""
        if self._mqtt is not None:
            return
        self._thread = threading.Thread(target=self._ingest, name="fleet-ingest", daemon=True)
        self._thread.start()
        kwargs: dict[str, Any] = {}
        if any(qos != 1 for qos in self._subscription_qos.values()):
            kwargs["subscription_qos"] = self._subscription_qos
        self._mqtt = self._mqtt_factory(
            self.settings,
            self._events.put,
            subscriptions=self._subscriptions,
            manual_ack=False,
            **kwargs,
        )
        try:
            self._mqtt.start()
        except BaseException:
            self.close()
            raise
        if not self.wait_synced(timeout):
            client = self._mqtt
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
        client = self._mqtt
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
        """True when the broker replays a retained message to a wildcard subscription.

        Publishes a retained probe on this controller's own topic, subscribes to a wildcard
        that matches it, then publishes a live *fence* on the same wildcard: the broker
        queues retained messages for a subscription before it routes a later publish, so
        the fence arriving first means no replay (RabbitMQ before 3.13). The probe is
        cleared afterwards. No answer within ``timeout``: False (the compatible choice).
        """
        client = self._mqtt
        if client is None:
            raise BrokerUnreachable("the fleet controller is not started")
        nonce = uuid.uuid4().hex.encode()
        with self._cond:
            self._probe_nonce, self._probe_result = nonce, None
        deadline = time.monotonic() + timeout
        self.publish(self._probe_topic, nonce, retain=True, timeout=timeout)
        wildcard = self._probe_topic.rsplit("/", 1)[0] + "/+"
        try:
            client.subscribe([wildcard], qos=self._subscription_qos[self._fence.topic])
            self.publish(self._probe_fence, nonce, timeout=max(0.1, deadline - time.monotonic()))
            with self._cond:
                while self._probe_result is None and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
                result = self._probe_result
        finally:
            client.unsubscribe([wildcard])
            self.publish(self._probe_topic, b"", retain=True, timeout=timeout)
        if result is None:
            log.warning("fleet controller: the retained-wildcard probe did not come back")
        log.info("fleet controller: broker replays retained messages to wildcards: %s", result)
        return bool(result)

    def rollcall(self, window_s: float | None = None) -> None:
        """Ask every agent to publish its status and function states again, live, at a
        random moment within ``window_s`` (default ``rollcall_window_s``), and wait for the
        window to pass: how a view fills on a broker that replays no retained statuses to
        wildcards. N nodes answer at about N / window statuses per second."""
        window = self.rollcall_window_s if window_s is None else window_s
        rid = f"{self.controller_id}-rollcall-{next(self._request_ids):x}"
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
        client, self._mqtt = self._mqtt, None
        if client is not None:
            client.stop()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._events.put(_Stop())
            thread.join(5)
        with self._cond:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()

    def __enter__(self) -> FleetController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._mqtt is not None and self._mqtt.connected

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
                    for watcher in self._watchers:
                        watcher.set()

    def _handle(self, event: MqttEvent, now: float, wall: float) -> bool:
        """Apply one event (lock held); True when a rollout's results may have changed."""
        if isinstance(event, Message):
            return self._handle_message(event, now, wall)
        if isinstance(event, Published):
            if event.mid in self._acks:
                self._acks[event.mid] = event
        elif isinstance(event, Connected):
            self._last_failure = None
            assert self._mqtt is not None
            self._mqtt.publish(self._fence.topic, self._fence.arm(), qos=1)
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
        if msg.topic in (self._probe_topic, self._probe_fence):
            if msg.payload == self._probe_nonce and self._probe_result is None:
                self._probe_result = msg.topic == self._probe_topic and msg.retain
            return False
        if msg.topic in self._index_sent:  # our own write is newer until it comes back
            if self._index_sent[msg.topic] == msg.payload:
                del self._index_sent[msg.topic]
            return False
        kind = self.view.ingest(msg.topic, msg.payload, now=now, retained=msg.retain, wall=wall)
        if kind == "bad":
            log.debug("fleet controller: ignored %s", self.view.last_error)
        elif kind == "unknown" and self._on_message is not None:
            self._on_message(msg.topic, msg.payload)
        return kind in ("status", "function_state")

    def _send_invoke(
        self,
        client: MqttClient,
        topic: str,
        body: bytes,
        rid: str,
        future: Future[dict[str, Any]],
        deadline: float,
    ) -> None:
        """Publish an invoke until the broker acknowledges it (or its reply comes first);
        the agent deduplicates the copies by request id (see :meth:`_wait_puback`)."""

        def send() -> int:
            return client.publish(
                topic, body, qos=1, correlation_data=rid.encode(), response_topic=self.reply_topic
            )

        with self._cond:
            ack = self._wait_puback(client, send, deadline, future.done)
        if ack is not None and ack.refused:
            raise PublishRefused(
                f"the broker refused the invoke on {topic}: {ack.reason} ({ack.reason_code:#04x})"
            )

    def _await_reply(
        self,
        client: MqttClient,
        topic: str,
        body: bytes,
        rid: str,
        future: Future[dict[str, Any]],
        deadline: float,
    ) -> dict[str, Any]:
        """The reply to ``rid``, asking again while it is late (FutureTimeout at ``deadline``).

        A broker may lose a reply it acknowledged to the agent: a NATS cluster whose node
        died has been seen to stop delivering to a QoS 1 subscription that stayed connected
        (a JetStream consumer it never repaired), and a clean-session controller that
        reconnects loses what was queued for it. The agent keeps every reply in its dedupe
        table (``dedupe_window_s``) and answers a duplicate request with it, so asking again
        turns any lost reply into a late one; a duplicate of a request still running costs the
        agent a log line. The asks back off from :data:`REPLY_REASK_S` to
        :data:`REPLY_REASK_MAX_S`.
        """
        wait = REPLY_REASK_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FutureTimeout
            try:
                return future.result(min(wait, remaining))
            except FutureTimeout:
                if time.monotonic() >= deadline or self._mqtt is not client:
                    raise
            self.stats["invokes_reasked"] += 1
            log.info("fleet controller: no reply to %s in %gs; asking again", rid, wait)
            self._send_invoke(client, topic, body, rid, future, deadline)
            wait = min(wait * 2, REPLY_REASK_MAX_S)

    def _wait_puback(
        self,
        client: MqttClient,
        send: Callable[[], int],
        deadline: float,
        enough: Callable[[], bool],
    ) -> Published | None:
        """Publish with ``send`` and wait (lock held) for the PUBACK, until ``deadline`` or
        ``enough()``; None without one.

        A clustered broker electing new leaders for its message store (NATS after a node
        died) may never acknowledge a publish, and MQTT resends one only after a reconnect:
        so while connected and without a PUBACK after ``INVOKE_RESEND_S`` the message goes
        again (a late PUBACK of an earlier copy is ignored). Everything the controller
        publishes is idempotent or deduplicated by the agent (request ids).
        """
        mid = send()
        self._acks[mid] = None
        try:
            while True:
                resend_at = min(deadline, time.monotonic() + INVOKE_RESEND_S)
                while (ack := self._acks[mid]) is None and not enough():
                    remaining = resend_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if ack is not None or enough() or time.monotonic() >= deadline:
                    return ack
                if client.connected:  # while disconnected paho sends the copy it holds
                    del self._acks[mid]
                    mid = send()
                    self._acks[mid] = None
                    self.stats["publishes_resent"] += 1
                    log.info("fleet controller: no PUBACK in %gs; published again", INVOKE_RESEND_S)
        finally:
            self._acks.pop(mid, None)

    def _handle_reply(self, msg: Message) -> None:
        try:
            reply = protocol.decode_reply(msg.payload)
        except AgentError as exc:
            log.warning("fleet controller: unreadable reply: %s", exc)
            return
        key = msg.correlation_data.decode("utf-8", "replace") if msg.correlation_data else None
        future = self._pending.pop(key, None) if key else None
        if future is None and isinstance(reply.get("request_id"), str):
            future = self._pending.pop(reply["request_id"], None)
        if future is None:
            self.stats["late_replies"] += 1  # its caller gave up (ReplyTimeout) already
        elif not future.done():
            future.set_result(reply)

    # -- reading the fleet -------------------------------------------------------------------

    def nodes(self, status: EdgeNodeStatus | None = None) -> list[EdgeNode]:
        with self._cond:
            return self.view.nodes(self._clock(), status)

    def node(self, node_id: str) -> EdgeNode | None:
        with self._cond:
            rec = self.view.records.get(node_id)
            return None if rec is None else self.view.refresh(rec, self._clock())

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
        with self._cond:
            return rollout.targets(self.view, spec, self._clock())

    # -- publishing --------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 30.0
    ) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK: BrokerUnreachable if none comes,
        PublishRefused if it carries a failure reason (MQTT 5: not authorized, ...).

        Without a PUBACK after ``INVOKE_RESEND_S`` the message goes again (a clustered
        broker electing leaders may drop a publish; MQTT resends only after a reconnect):
        what the controller publishes (retained specs and states, desired state) is
        idempotent. The deadline covers a cluster's failover (NATS: up to about 20 s).
        """
        client = self._mqtt
        if client is None:
            raise BrokerUnreachable("the fleet controller is not started")
        deadline = time.monotonic() + timeout

        def send() -> int:
            return client.publish(topic, payload, qos=1, retain=retain)

        with self._cond:
            ack = self._wait_puback(client, send, deadline, lambda: False)
        if ack is None:
            raise BrokerUnreachable(
                f"the broker did not acknowledge the publish to {topic} within {timeout:g}s"
            )
        if ack.refused:  # a spec the ACL forbids is not deployed: say so, never "sent"
            raise PublishRefused(
                f"the broker refused the publish to {topic}: {ack.reason} ({ack.reason_code:#04x})"
            )

    def publish_nowait(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Hand a QoS 1 message to the connection without waiting for the broker (safe from
        ``on_message``, which runs on the ingest thread)."""
        client = self._mqtt
        if client is None:
            raise BrokerUnreachable("the fleet controller is not started")
        client.publish(topic, payload, qos=1, retain=retain)

    def spec_topic(self, function_id: str, node_id: str | None = None) -> str:
        topics = self.view.topics
        if node_id is None:
            return topics.fleet_function(function_id)
        return topics.node(node_id).node_function(function_id)

    def publish_spec(self, spec: protocol.FunctionSpec, node_id: str | None = None) -> None:
        """Publish ``spec`` retained, fleet-wide (``node_id`` None) or for one node; signed
        for that target with a new sequence when the controller has a signer. Then the
        spec index (see :meth:`update_indexes`)."""
        self._publish_spec(spec, node_id)
        self.update_indexes([(node_id, spec.id, spec.version)])

    def _publish_spec(self, spec: protocol.FunctionSpec, node_id: str | None) -> None:
        if self.signer is not None:
            target = protocol.FLEET_TARGET if node_id is None else node_id
            spec = self.signer.sign(spec, target=target, sequence=self.next_sequence(spec))
        self.publish(self.spec_topic(spec.id, node_id), protocol.encode_spec(spec), retain=True)

    def _republish_node_specs(self, function_id: str, node_ids: Iterable[str]) -> None:
        """Publish again, byte for byte, each node's retained per-node spec as the view holds
        it: the same signature and sequence, so an agent that got it takes it as the no-op a
        retained replay is (signing again would make a new spec and restart a deploy in
        progress)."""
        for node_id in node_ids:
            with self._cond:
                payload = self.view.node_specs.get((node_id, function_id))
            if payload:
                self.publish(self.spec_topic(function_id, node_id), payload, retain=True)

    def next_sequence(self, spec: protocol.FunctionSpec) -> int:
        """A sequence above every one this controller used and every retained spec of the
        function shows: the wall clock in milliseconds, or one more than the highest seen.

        The clock needs no coordination between controllers and keeps going up after a
        function was removed (its retained specs gone, the nodes' last sequence kept); the
        retained floor covers a controller whose clock is behind the last publisher's.
        An explicit ``spec.sequence`` above both wins (``edgectl deploy --sequence``).
        """
        with self._cond:
            retained = [self.view.fleet_specs.get(spec.id)]
            retained += [raw for (_, fid), raw in self.view.node_specs.items() if fid == spec.id]
        seen = [_sequence_of(raw) for raw in retained if raw]
        floor = max([self._last_sequence, *seen]) + 1
        sequence = max(floor, int(time.time() * 1000), spec.sequence or 0)
        self._last_sequence = sequence
        return sequence

    def clear_spec(self, function_id: str, node_id: str | None = None) -> bool:
        """Clear the retained spec (nodes remove the function, or fall back to the fleet
        spec); True when there was one."""
        with self._cond:
            if node_id is None:
                had = function_id in self.view.fleet_specs
            else:
                had = (node_id, function_id) in self.view.node_specs
        self.publish(self.spec_topic(function_id, node_id), b"", retain=True)
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
        topics = self.view.topics
        out: list[tuple[str, bytes]] = []
        with self._cond:
            fleet = dict(self.view.fleet_index)
            nodes = {n: dict(fns) for n, fns in self.view.node_index.items()}
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
            self.view.fleet_index, self.view.node_index = fleet, nodes
            watched = (topics.fleet_index, topics.node_catalog)  # node indexes never come back
            self._index_sent.update((t, p) for t, p in out if t in watched)
        for topic, payload in out:
            self.publish(topic, payload, retain=True)

    def deploy_fleet(self, spec: protocol.FunctionSpec) -> list[str]:
        """Publish the fleet spec; the nodes that will deploy it now (the rollout's targets)."""
        targets = self.targets(spec)
        self.publish_spec(spec)
        return targets

    def deploy_nodes(self, spec: protocol.FunctionSpec, node_ids: Iterable[str]) -> list[str]:
        """Publish a per-node spec to each node; the nodes."""
        nodes = list(dict.fromkeys(node_ids))
        for node_id in nodes:
            self._publish_spec(spec, node_id)
        self.update_indexes([(node_id, spec.id, spec.version) for node_id in nodes])
        return nodes

    def forget_node(self, node_id: str) -> bool:
        """Clear a decommissioned node's retained status and function states."""
        with self._cond:
            known = node_id in self.view.records
            fids = list(self.view.states.get(node_id, {}))
        topics = self.view.topics.node(node_id)
        for fid in fids:
            self.publish(topics.function_state(fid), b"", retain=True)
        self.publish(topics.status, b"", retain=True)
        with self._cond:
            self.view.records.pop(node_id, None)
            self.view.states.pop(node_id, None)
        return known

    # -- rollouts ----------------------------------------------------------------------------

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
        node_ids = self.targets(spec) if nodes is None else list(dict.fromkeys(nodes))
        started = time.monotonic()
        deadline = started + timeout
        repush_wait = REPUSH_S
        repush_at = started + repush_wait
        with self._cond:  # offline is final at once only for nodes the controller never saw
            reachable = {n for n in node_ids if n in self.view.records}
        changed = threading.Event()
        last: dict[str, rollout.NodeResult] | None = None
        with self._cond:
            self._watchers.add(changed)
        try:
            while True:
                changed.clear()
                with self._cond:
                    current = rollout.report(
                        self.view,
                        spec,
                        node_ids,
                        self._clock(),
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
                        self.stats["specs_repushed"] += len(pending)
                        repush(pending)
                    repush_wait *= 2
                    repush_at = time.monotonic() + repush_wait
                # Woken by status/state messages; every 0.25 s anyway (staleness advances).
                changed.wait(min(0.25, max(0.0, deadline - time.monotonic())))
        finally:
            with self._cond:
                self._watchers.discard(changed)

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
        fid = spec.id
        with self._cond:
            now = self._clock()
            eligible = rollout.targets(self.view, spec, now)
            count = rollout.canary_count(canary, len(eligible)) if eligible else 0
            canaries = rollout.pick_canaries(self.view, spec, now, count)
            previous = {n: self.view.node_specs.get((n, fid)) for n in canaries}
            previous_fleet = self.view.fleet_specs.get(fid)
        if not canaries:
            raise DeploymentRejected(
                f"{fid}: no ONLINE node satisfies requires {spec.requires}: nothing to canary"
            )
        self.deploy_nodes(spec, canaries)
        canary_report = self.wait_rollout(
            spec,
            canaries,
            canary_timeout_s,
            on_progress,
            phase="canary",
            repush=lambda pending: self._republish_node_specs(fid, pending),
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
        fleet_targets = sorted(set(self.targets(spec)) | set(canaries))
        self.publish_spec(spec)  # first the fleet spec, then the canaries follow it
        for node_id in canaries:
            self.clear_spec(fid, node_id)
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
        groups: dict[bytes, list[str]] = {}
        for node_id, own in previous.items():
            if own is not None and self.signer is not None:
                # The old code again, under a new sequence: the node refuses a replay.
                old = protocol.decode_spec(own, expected_id=fid)
                self.publish_spec(replace(old, signature=None, sequence=None), node_id)
            elif own is not None:
                self.publish(self.spec_topic(fid, node_id), own, retain=True)
            else:
                self.clear_spec(fid, node_id)  # falls back to the fleet spec, or removes it
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

    # -- invocations -------------------------------------------------------------------------

    def invoke(
        self, node_id: str, function_id: str, payload: Any = None, *, timeout: float | None = None
    ) -> RemoteResult:
        """Invoke a function on a node; its value, or the error class the node named.

        A reply that does not come within ``timeout`` (default ``invoke_timeout_s``) raises
        :class:`ReplyTimeout`, a ``FunctionTimeout``.
        """
        client = self._mqtt
        if client is None:
            raise BrokerUnreachable("the fleet controller is not started")
        timeout = self.invoke_timeout_s if timeout is None else timeout
        rid = f"{self.controller_id}-{next(self._request_ids):x}"
        try:
            topic = self.view.topics.node(node_id).invoke
            body = protocol.encode_invoke(rid, function_id, payload, reply_to=self.reply_topic)
        except (ValueError, TypeError) as exc:  # a bad id, or a payload that is not JSON
            raise BadRequest(f"invoke {function_id} on {node_id}: {exc}") from exc
        future: Future[dict[str, Any]] = Future()
        with self._cond:
            self._pending[rid] = future
        started = time.monotonic()
        deadline = started + timeout
        try:
            self._send_invoke(client, topic, body, rid, future, deadline)
            reply = self._await_reply(client, topic, body, rid, future, deadline)
        except FutureTimeout:
            with self._cond:
                self._pending.pop(rid, None)
            node = self.node(node_id)
            where = "unknown to this controller" if node is None else node.status.value
            raise ReplyTimeout(
                f"no reply arrived from {node_id} for {function_id} (request {rid}) within "
                f"{timeout:g}s; the node is {where}"
            ) from None
        round_trip_ms = (time.monotonic() - started) * 1000
        if not reply["ok"]:
            raise error_from_dict(reply["error"])
        return RemoteResult(
            value=reply["result"],
            node_id=node_id,
            request_id=rid,
            duration_ms=float(reply["duration_ms"]),
            cold_start=bool(reply["cold_start"]),
            round_trip_ms=round_trip_ms,
        )


def _sequence_of(raw: bytes) -> int:
    """The ``sequence`` of a retained spec, 0 when it has none or does not parse."""
    try:
        value = json.loads(raw).get("sequence")
    except (ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
