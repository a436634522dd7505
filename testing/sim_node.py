"""One simulated gateway of fleet-sim: a real MQTT connection speaking the agent's contract.

Owns :class:`SimNode`: how one node subscribes, reports its status and heartbeats, checks
and "deploys" a spec (its bytes hashed first, a source bundle compiled, a zip searched for
its entrypoint's module, nothing run), answers invokes, and owes its retained reports until
the broker's PUBACK. It goes through the agent's own protocol code and never writes a topic
or a message by hand. The selector loop that drives every node is :class:`SimFleet`'s
(:mod:`testing.fleet_sim`); a node must never block or start a thread of its own.
"""

from __future__ import annotations

import time
import zipfile
from io import BytesIO
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__
from agent.contract import protocol
from agent.edge.loop import STATUS_REFRESH_HEARTBEATS as STATUS_REFRESH
from agent.errors import AgentError, DeploymentRejected, error_to_dict
from agent.exec.bundles import sha256_hex

if TYPE_CHECKING:
    from testing.fleet_sim import SimFleet

MAX_PAYLOAD = 262144
RESEND_MAX_S = 30.0


class SimNode:
    """One simulated gateway: its client, its specs, its deployed functions."""

    def __init__(self, fleet: SimFleet, node_id: str, capabilities: list[str]) -> None:
        self.fleet = fleet
        self.node_id = node_id
        self.capabilities = capabilities
        self.topics = protocol.Topics(fleet.prefix, node_id)
        #: function id -> {"fleet"/"node": spec}
        self.sources: dict[str, dict[str, protocol.FunctionSpec]] = {}
        #: function id -> (fingerprint, spec, state, active version)
        self.deployed: dict[str, tuple[str, protocol.FunctionSpec, str, str | None]] = {}
        self.invocations: dict[str, int] = {}
        self.seq = 0
        self.started = time.monotonic()
        self.connected = False
        self.dead = False  # killed on purpose: no reconnect
        self.muted = False  # heartbeats paused on purpose
        #: retained topic -> [payload, mid, due, wait]: published, no PUBACK yet
        self.owed: dict[str, list[Any]] = {}
        self.owed_mids: dict[int, str] = {}
        self.resend_due: float | None = None  # the node's one resend timer
        self.subscribing: dict[int, list[str]] = {}  # SUBSCRIBE mid -> its filters
        self.refused: list[str] = []  # filters the broker refused: asked for again
        self.connection = 0  # counts connections: a retry belongs to one
        v5 = fleet.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sim-{node_id}",
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else True,
        )
        client.will_set(
            self.topics.status,
            self._status("offline", {"reason": "connection lost"}),
            qos=1,
            retain=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.max_inflight_messages_set(0)  # no window: owed copies are replaced, not queued
        client.on_socket_open = fleet._on_socket_open
        client.on_socket_close = fleet._on_socket_close
        client.on_socket_register_write = fleet._on_register_write
        client.on_socket_unregister_write = fleet._on_unregister_write
        client.user_data_set(self)
        self.client = client

    def _status(self, status: str, extra: dict[str, Any] | None = None) -> bytes:
        if status != "offline":  # as the agent: how stale a retained status may get
            hb = self.fleet.heartbeat_s
            refresh = {"heartbeat_interval_s": hb, "status_refresh_s": hb * STATUS_REFRESH}
            extra = {**refresh, **(extra or {})}
        return protocol.encode_status(
            self.node_id,
            status,
            agent_version=f"{__version__}+sim",
            name=f"simulated {self.node_id}",
            location="fleet-sim",
            capabilities=self.capabilities,
            extra=extra,
        )

    # -- connection --------------------------------------------------------------------------

    def connect(self) -> None:
        host, port = self.fleet.endpoint_for(self.node_id)
        if self.fleet.protocol != "5":  # MQTT 3.1.1 (NATS): clean session, no properties
            self.client.connect(host, port, keepalive=self.fleet.keepalive)
            return
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        self.client.connect(
            host,
            port,
            keepalive=self.fleet.keepalive,
            clean_start=True,
            properties=props,
        )

    def _on_connect(self, client: paho.Client, node: Any, flags: Any, reason: Any, p: Any) -> None:
        if reason.is_failure:
            return
        self.connected = True
        self.connection += 1
        self.subscribing.clear()
        self.refused = []
        self.subscribe(self.topics.subscriptions())
        self.publish_owed(self.topics.status, self._status("online"))
        # paho sends the held copies of other owed reports again now: restart their clocks
        now = time.monotonic()
        for entry in self.owed.values():
            entry[2], entry[3] = now + self._jitter(self.fleet.resend_s), self.fleet.resend_s
        self._arm_resend()
        self.fleet.schedule_heartbeat(self, 0.0)
        self.fleet.on_node_connected(self)

    def _on_disconnect(self, client: paho.Client, node: Any, f: Any, reason: Any, p: Any) -> None:
        was = self.connected
        self.connected = False
        if was:
            self.fleet.on_node_disconnected(self)
        if not self.dead and not self.fleet.stopping:
            self.fleet.schedule_reconnect(self)

    def subscribe(self, filters: list[str]) -> None:
        _, mid = self.client.subscribe([(t, 1) for t in filters])
        if mid is not None:
            self.subscribing[mid] = filters

    def _on_subscribe(
        self, client: paho.Client, node: Any, mid: int, codes: list[Any], p: Any
    ) -> None:
        """As the agent: a filter the broker refused (SUBACK 0x80: NATS could not create the
        JetStream consumer of a QoS 1 subscription in time) is asked for again ~1 s later."""
        filters = self.subscribing.pop(mid, [])
        failed = [t for t, code in zip(filters, codes, strict=False) if code.is_failure]
        if failed:
            self.refused.extend(failed)
            self.fleet.refused += len(failed)
            delay = self.fleet.rng.uniform(1.0, 2.0)
            self.fleet.push_timer(time.monotonic() + delay, f"resub{self.connection}", self)

    def resubscribe(self) -> None:
        filters, self.refused = self.refused, []
        if filters and self.connected:
            self.subscribe(filters)

    # -- what the node owes: retained publishes until their PUBACK ----------------------------

    def _jitter(self, wait: float) -> float:
        return wait * self.fleet.rng.uniform(1.0, 1.5)

    def publish_owed(self, topic: str, payload: bytes, wait: float | None = None) -> None:
        """Publish a retained QoS 1 message that must reach the broker: tracked by mid until
        its PUBACK, published again by the resend timer; replaces what was owed on ``topic``."""
        previous = self.owed.get(topic)
        if previous is not None:
            self._forget(previous[1])
        mid = self.client.publish(topic, payload, qos=1, retain=True).mid
        wait = self.fleet.resend_s if wait is None else wait
        self.owed[topic] = [payload, mid, time.monotonic() + self._jitter(wait), wait]
        self.owed_mids[mid] = topic
        self._arm_resend()

    def _forget(self, mid: int) -> None:
        """Drop a superseded unacknowledged copy, so a reconnect does not send it again
        (paho keeps no public handle on its resend queue; as ``MqttClient.forget``)."""
        self.owed_mids.pop(mid, None)
        client = self.client
        with client._out_message_mutex:
            client._out_messages.pop(mid, None)

    def _on_publish(self, client: paho.Client, node: Any, mid: int, reason: Any, p: Any) -> None:
        topic = self.owed_mids.pop(mid, None)
        if topic is None:
            return  # a heartbeat or a reply
        entry = self.owed.get(topic)
        if entry is not None and entry[1] == mid:
            if getattr(reason, "is_failure", False):  # MQTT 5: refused; the timer sends again
                return
            del self.owed[topic]
            self.fleet.acked += 1

    def _arm_resend(self) -> None:
        if not self.owed:
            return
        due = min(entry[2] for entry in self.owed.values())
        if self.resend_due is None or due < self.resend_due:
            self.resend_due = due
            self.fleet.push_timer(due, "resend", self)

    def resend(self, now: float) -> None:
        """The resend timer: publish again what is owed and overdue (only while connected:
        while disconnected paho holds the copies and sends them on the reconnect)."""
        self.resend_due = None
        if not self.connected:
            return  # _on_connect restarts the clocks
        for topic, (payload, _mid, due, wait) in list(self.owed.items()):
            if due <= now:
                self.publish_owed(topic, payload, min(wait * 2, RESEND_MAX_S))
                self.fleet.resent += 1
        self._arm_resend()

    # -- messages ----------------------------------------------------------------------------

    def _on_message(self, client: paho.Client, node: Any, msg: paho.MQTTMessage) -> None:
        kind, fid = self.topics.classify(msg.topic)
        payload = bytes(msg.payload)
        if kind in ("fleet_spec", "node_spec") and fid is not None:
            self.on_spec("fleet" if kind == "fleet_spec" else "node", fid, payload)
        elif kind == "invoke":
            props = getattr(msg, "properties", None)
            self.on_invoke(
                payload,
                getattr(props, "ResponseTopic", None),
                getattr(props, "CorrelationData", None),
            )

    def on_spec(self, scope: str, fid: str, payload: bytes) -> None:
        sources = self.sources.setdefault(fid, {})
        if protocol.is_removal(payload):
            sources.pop(scope, None)
        else:
            try:
                sources[scope] = protocol.decode_spec(payload, expected_id=fid)
            except AgentError as exc:
                previous = self.deployed.get(fid)
                active = previous[3] if previous else None
                self._report(fid, None, None, "rejected", error_to_dict(exc), active)
                return
        self.reconcile(fid)

    def reconcile(self, fid: str) -> None:
        sources = self.sources.get(fid, {})
        spec = sources.get("node") or sources.get("fleet")
        if spec is not None and not protocol.requires_met(spec, self.capabilities):
            spec = None
        previous = self.deployed.get(fid)
        if spec is None:
            if previous is not None:
                del self.deployed[fid]
                self._report(fid, previous[1].version, previous[1].code.sha256, "removed", None)
            return
        fingerprint = protocol.spec_fingerprint(spec)
        if previous is not None and previous[0] == fingerprint:
            return  # re-delivery of what is deployed: a no-op, as on a real agent
        active = previous[3] if previous else None
        error: dict[str, Any] | None
        try:
            self._verify(spec)
        except DeploymentRejected as exc:
            state, error = "rejected", error_to_dict(exc)
        except SyntaxError as exc:
            state = "failed"
            error = {"type": "handler_error", "message": f"cannot load {spec.entrypoint}: {exc}"}
        else:
            state, error, active = "active", None, spec.version
            fail = spec.environment.get("FLEET_SIM_FAIL", "")
            if fail == "all" or self.node_id in fail.split(","):
                state, active = "failed", previous[3] if previous else None
                error = {"type": "handler_error", "message": "FLEET_SIM_FAIL: simulated failure"}
        self.deployed[fid] = (fingerprint, spec, state, active)
        self._report(fid, spec.version, spec.code.sha256, state, error, active)

    def _verify(self, spec: protocol.FunctionSpec) -> None:
        raw = protocol.code_bytes(spec.code)
        if sha256_hex(raw) != spec.code.sha256.lower():
            raise DeploymentRejected(
                f"bundle for {spec.id} {spec.version}: sha256 mismatch: spec says "
                f"{spec.code.sha256[:16]}..., the bytes hash to {sha256_hex(raw)[:16]}..."
            )
        module = spec.entrypoint.partition(":")[0]
        if spec.code.format == "source":
            compile(raw, f"{module}.py", "exec", dont_inherit=True)
            return
        try:
            names = set(zipfile.ZipFile(BytesIO(raw)).namelist())
        except zipfile.BadZipFile as exc:
            raise DeploymentRejected(f"bundle for {spec.id}: not a zip ({exc})") from exc
        path = module.replace(".", "/")
        if f"{path}.py" not in names and f"{path}/__init__.py" not in names:
            raise DeploymentRejected(f"bundle for {spec.id}: no module {module}")

    def _report(
        self,
        fid: str,
        version: str | None,
        sha256: str | None,
        state: str,
        error: dict[str, str] | None,
        active: str | None = None,
    ) -> None:
        payload = protocol.encode_function_state(
            fid, version, sha256, state, error, extra={"active_version": active}
        )
        self.publish_owed(self.topics.function_state(fid), payload)

    def on_invoke(self, payload: bytes, response_topic: str | None, correlation: Any) -> None:
        started = time.perf_counter()
        try:
            request = protocol.decode_invoke(payload, MAX_PAYLOAD)
        except protocol.InvokeDecodeError as exc:
            topic = self.topics.reply_topic(response_topic, exc.reply_to)
            body = self._reply(exc.request_id, exc.function_id, error=error_to_dict(exc))
            self._publish_reply(topic, body, correlation)
            return
        address = self.topics.reply_address(response_topic, request.reply_to)
        topic = address.topic
        fid = request.function_id
        deployed = self.deployed.get(fid)
        error: dict[str, str] | None = None
        result: Any = None
        if address.refused is not None:  # as a real agent: never reply into the contract
            message = f"invoke: reply address refused: {address.refused}"
            error = {"type": "bad_request", "message": message}
        elif deployed is None or deployed[3] is None:
            error = {"type": "function_not_found", "message": f"Function not found: {fid}"}
        elif isinstance(request.payload, dict) and "sim_error" in request.payload:
            kind = str(request.payload["sim_error"])
            error = {"type": kind, "message": f"simulated {kind} in {fid}"}
        else:
            self.invocations[fid] = self.invocations.get(fid, 0) + 1
            result = {
                "node_id": self.node_id,
                "function_id": fid,
                "version": deployed[3],
                "echo": request.payload,
            }
        duration_ms = (time.perf_counter() - started) * 1000
        body = self._reply(request.request_id, fid, result=result, error=error, ms=duration_ms)
        self._publish_reply(topic, body, correlation)

    def _reply(
        self,
        request_id: str | None,
        fid: str | None,
        *,
        result: Any = None,
        error: dict[str, str] | None = None,
        ms: float = 0.0,
    ) -> bytes:
        return protocol.encode_reply(
            request_id,
            fid,
            ok=error is None,
            result=result,
            error=error,
            duration_ms=round(ms, 3),
            cold_start=False,
            node_id=self.node_id,
        )

    def _publish_reply(self, topic: str, body: bytes, correlation: Any) -> None:
        props = None
        if correlation is not None and self.fleet.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation
        self.client.publish(topic, body, qos=1, properties=props)

    def heartbeat(self) -> None:
        self.seq += 1
        functions = [
            {
                "id": fid,
                "version": active or spec.version,
                "state": state,
                "invocations": self.invocations.get(fid, 0),
                "errors": 0,
                "timeouts": 0,
                "p50_ms": None,
                "p95_ms": None,
            }
            for fid, (_, spec, state, active) in self.deployed.items()
        ]
        rng = self.fleet.rng
        payload = protocol.encode_heartbeat(
            self.node_id,
            self.seq,
            round(time.monotonic() - self.started, 3),
            "online",
            {
                "cpu_percent": round(rng.uniform(1, 40), 1),
                "memory_used_mb": round(rng.uniform(200, 600), 1),
                "memory_total_mb": 1987.0,
                "disk_free_mb": 10240.0,
                "load_1m": round(rng.uniform(0, 1.5), 2),
            },
            functions,
            extra={
                "outbox": {"messages": 0, "bytes": 0},
                "inflight": 0,
                "interval_s": self.fleet.heartbeat_s,
            },
        )
        self.client.publish(self.topics.heartbeat, payload, qos=0)
        if self.seq % STATUS_REFRESH == 0:  # the retained status's ts is "last seen"
            self.publish_owed(self.topics.status, self._status("online"))
