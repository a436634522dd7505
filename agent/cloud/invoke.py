"""``Invocations``: a function call on a node, over MQTT request/response.

Owns the pending requests (request id -> Future), publishing an invoke until the broker
acknowledges it, asking again while its reply is late, and matching replies to requests.

Replies: invocations carry ``reply_to = <p>/controllers/<controller id>/replies`` and MQTT 5
Correlation Data (the request id); the agent echoes the correlation data on the reply, and
the request id in its body serves MQTT 3.1.1. (``MqttClient.publish`` cannot set the MQTT 5
Response Topic property yet, so the topic travels in the body's ``reply_to``.)

Must never: block in :meth:`Invocations.on_reply` (the ingest thread calls it with the lock
held), or run a handler's error as anything but the class the node named.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from agent.cloud.link import ControllerLink, log
from agent.contract import protocol
from agent.errors import (
    AgentError,
    BadRequest,
    PublishRefused,
    ReplyTimeout,
    error_from_dict,
)
from agent.models import EdgeNode
from agent.mqtt import Message, MqttClient

#: An acknowledged invoke without a reply after this long is asked again (same request id;
#: the agent answers a duplicate from its dedupe table, or takes it as already running),
#: then after twice that, up to :data:`REPLY_REASK_MAX_S` between two asks.
REPLY_REASK_S = 5.0
REPLY_REASK_MAX_S = 20.0


@dataclass(frozen=True)
class RemoteResult:
    """A remote invocation's reply: the handler's value and what the node said about it."""

    value: Any
    node_id: str
    request_id: str
    duration_ms: float
    cold_start: bool
    round_trip_ms: float


class Invocations:
    """Request/response over the shared link, with replies on ``reply_topic``."""

    def __init__(
        self,
        link: ControllerLink,
        *,
        controller_id: str,
        reply_topic: str,
        node: Callable[[str], EdgeNode | None],
    ) -> None:
        self._link = link
        self._controller_id = controller_id
        self._reply_topic = reply_topic
        self._node = node  # for the timeout's message: what the controller knows of it
        self._pending: dict[str, Future[dict[str, Any]]] = {}

    def invoke(
        self, node_id: str, function_id: str, payload: Any, *, timeout: float
    ) -> RemoteResult:
        """Invoke a function on a node; its value, or the error class the node named.

        A reply that does not come within ``timeout`` raises :class:`ReplyTimeout`, a
        ``FunctionTimeout``.
        """
        link = self._link
        client = link.client()
        rid = f"{self._controller_id}-{next(link.request_ids):x}"
        try:
            topic = link.view.topics.node(node_id).invoke
            body = protocol.encode_invoke(rid, function_id, payload, reply_to=self._reply_topic)
        except (ValueError, TypeError) as exc:  # a bad id, or a payload that is not JSON
            raise BadRequest(f"invoke {function_id} on {node_id}: {exc}") from exc
        future: Future[dict[str, Any]] = Future()
        with link.cond:
            self._pending[rid] = future
        started = time.monotonic()
        deadline = started + timeout
        try:
            self._send(client, topic, body, rid, future, deadline)
            reply = self._await_reply(client, topic, body, rid, future, deadline)
        except FutureTimeout:
            with link.cond:
                self._pending.pop(rid, None)
            node = self._node(node_id)
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

    def _send(
        self,
        client: MqttClient,
        topic: str,
        body: bytes,
        rid: str,
        future: Future[dict[str, Any]],
        deadline: float,
    ) -> None:
        """Publish an invoke until the broker acknowledges it (or its reply comes first);
        the agent deduplicates the copies by request id (see ``ControllerLink.wait_puback``)."""

        def send() -> int:
            return client.publish(
                topic, body, qos=1, correlation_data=rid.encode(), response_topic=self._reply_topic
            )

        with self._link.cond:
            ack = self._link.wait_puback(client, send, deadline, future.done)
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
                if time.monotonic() >= deadline or self._link.mqtt is not client:
                    raise
            self._link.stats["invokes_reasked"] += 1
            log.info("fleet controller: no reply to %s in %gs; asking again", rid, wait)
            self._send(client, topic, body, rid, future, deadline)
            wait = min(wait * 2, REPLY_REASK_MAX_S)

    def on_reply(self, msg: Message) -> None:
        """A message on the reply topic (ingest thread, lock held): complete its request."""
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
            self._link.stats["late_replies"] += 1  # its caller gave up (ReplyTimeout) already
        elif not future.done():
            future.set_result(reply)

    def cancel_all(self) -> None:
        """Cancel every pending request (lock held; the controller is closing)."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
