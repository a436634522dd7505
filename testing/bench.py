"""What the benchmark sections share: rows, timing, waits, and the MQTT bench gateway.

Owns the pieces more than one ``scripts/bench_*.py`` section uses, so no section imports
another: table rows (:func:`info_row`, :func:`latency_row_us`, :func:`latency_row`), per-call
timing (:func:`time_calls`), :class:`BenchError` and :func:`wait_until` (the harness's
:func:`~testing.wait.wait_for`, failing with BenchError), a runtime for local sections
(:func:`new_runtime`), and the MQTT sections' gateway: its node and topics, its agent
(:func:`bench_agent`, over :class:`testing.agent_process.AgentProcess`), its functions
(:func:`source_spec`, :func:`invoke_body`) and the cloud side that times requests
(:class:`Requester`).

It must never print a table or decide a target: each section does that for its own rows.
"""

from __future__ import annotations

import gc
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from agent import EdgeNode, EdgeRuntime
from agent.exec.metrics import percentile
from testing import specs
from testing.agent_process import AgentProcess
from testing.cloud import nodelay
from testing.outcomes import WaitTimeout
from testing.wait import wait_for

#: The MQTT sections' gateway and the topics the cloud side uses with it.
NODE = "gw-bench"
PREFIX = "edge"
INVOKE_TOPIC = f"{PREFIX}/nodes/{NODE}/invoke"
REPLY_TOPIC = f"{PREFIX}/nodes/{NODE}/replies"
STATUS_TOPIC = f"{PREFIX}/nodes/{NODE}/status"
STATE_TOPICS = f"{PREFIX}/nodes/{NODE}/functions/+/state"
#: Invokes in flight at once in the windowed (throughput) runs.
WINDOW = 32
ECHO_SOURCE = "def handler(event):\n    return event\n"


class BenchError(RuntimeError):
    """Something the benchmark waited for did not happen; the message says what."""


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.005) -> Any:
    """Poll ``predicate`` until truthy; BenchError naming ``what`` at the deadline."""
    try:
        return wait_for(predicate, timeout, what, poll=poll)
    except WaitTimeout as exc:
        raise BenchError(str(exc)) from None


def info_row(name: str, **extra: Any) -> dict[str, Any]:
    """A table row without latencies (a count, a size, a note)."""
    return {
        "name": name,
        "n": None,
        "p50_us": None,
        "p99_us": None,
        "rate": None,
        "ratio": None,
        "target": None,
        "passed": None,
        **extra,
    }


def latency_row_us(name: str, samples_us: list[float], **extra: Any) -> dict[str, Any]:
    """A table row of latencies in microseconds (nearest-rank percentiles); other sections
    (bench_mqtt) build theirs with it too."""
    ordered = sorted(samples_us)
    return {
        "name": name,
        "n": len(ordered),
        "p50_us": round(percentile(ordered, 50), 2),
        "p99_us": round(percentile(ordered, 99), 2),
        "mean_us": round(sum(ordered) / len(ordered), 2),
        "min_us": round(ordered[0], 2),
        "max_us": round(ordered[-1], 2),
        "rate": None,
        "ratio": None,
        "target": None,
        "passed": None,
        **extra,
    }


def latency_row(name: str, samples_ns: list[int], **extra: Any) -> dict[str, Any]:
    return latency_row_us(name, [ns / 1000 for ns in samples_ns], **extra)


def time_calls(call: Callable[[int], object], count: int, warmup: int) -> list[int]:
    """Per-call latencies in ns of ``call(i)`` after ``warmup`` unmeasured calls."""
    for i in range(warmup):
        call(i)
    gc.collect()
    samples = [0] * count
    clock = time.perf_counter_ns
    for i in range(count):
        start = clock()
        call(i)
        samples[i] = clock() - start
    return samples


def new_runtime(**kwargs: Any) -> EdgeRuntime:
    return EdgeRuntime(EdgeNode(id="bench", name="bench"), **kwargs)


def children() -> list[int]:
    """Pids of every descendant of this process."""
    return [child.pid for child in psutil.Process().children(recursive=True)]


def bench_agent(workdir: Path, port: int, **sections: Any) -> AgentProcess:
    """The MQTT sections' agent (not started): node :data:`NODE`, reconnect backoff at its
    defaults (0.5 / 60 s), a 30 s heartbeat, warning logs, ``durability = "normal"``;
    ``sections`` are merged in (``runtime={"max_workers": 8}``)."""
    base = {
        "node": {"id": NODE, "name": "bench gateway", "capabilities": ["python"]},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "agent": {
            "state_dir": str(workdir / "state"),
            "heartbeat_interval_s": 30.0,
            "log_level": "warning",
            "durability": "normal",
        },
    }
    return AgentProcess(workdir, port, NODE, base=base, **sections)


def invoke_body(function_id: str, seq: int) -> tuple[str, bytes]:
    """(request_id, JSON invoke request): the same bytes go to the floor and to the agent."""
    rid = uuid.uuid4().hex
    body = {"request_id": rid, "function_id": function_id, "payload": {"seq": seq, "pad": "x" * 32}}
    return rid, json.dumps(body).encode()


def source_spec(fid: str, source: str, **over: Any) -> dict[str, Any]:
    """A bench function's spec: module ``bench_<fid>``, 128 MB, 10 s unless overridden."""
    settings: dict[str, Any] = {"memory_mb": 128, "timeout_seconds": 10, **over}
    return specs.source_spec(fid, source, entrypoint=f"bench_{fid}:handler", **settings)


class Requester:
    """The cloud side: publishes QoS 1 requests and matches replies by ``request_id``.

    Replies (on ``reply_topics``) are JSON with a ``request_id``; the callback registered for
    that id runs in paho's network thread. Other messages (status, function states) are kept,
    the latest per topic, for :meth:`wait_topic`.
    """

    def __init__(self, port: int, reply_topics: list[str], other_topics: list[str]) -> None:
        self.port = port
        self.reply_topics = frozenset(reply_topics)
        self.topics = [*reply_topics, *other_topics]
        self._pending: dict[str, Callable[[dict[str, Any]], None]] = {}
        self.agent_replies = 0
        self._lock = threading.Lock()
        self._latest: dict[str, dict[str, Any]] = {}
        #: Messages received per topic other than the replies (paho's thread writes it).
        self.received: Counter[str] = Counter()
        self._changed = threading.Condition()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client: paho.Client | None = None

    def connect(self, timeout: float = 10.0) -> Requester:
        """Connect (again) with a fresh paho client and subscribe; returns once subscribed."""
        self.close()
        self._connected.clear()
        self._subscribed.clear()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-cloud-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        client.max_inflight_messages_set(1000)  # paho's default of 20 would cap the window
        client.on_socket_open = nodelay
        client.on_connect = lambda *args: self._connected.set()
        client.on_subscribe = lambda *args: self._subscribed.set()
        client.on_message = self._on_message
        self.client = client
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        if not self._connected.wait(timeout):
            raise BenchError(f"the requester got no CONNACK within {timeout:g} s")
        client.subscribe([(topic, 1) for topic in self.topics])
        if not self._subscribed.wait(timeout):
            raise BenchError(f"the requester got no SUBACK within {timeout:g} s")
        return self

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if not msg.payload:
            return
        body = json.loads(msg.payload)
        if msg.topic in self.reply_topics:
            if msg.topic == REPLY_TOPIC:
                self.agent_replies += 1  # only this thread writes it
            with self._lock:
                callback = self._pending.pop(body.get("request_id"), None)
            if callback is not None:
                callback(body)
            return
        with self._changed:
            self.received[msg.topic] += 1
            self._latest[msg.topic] = body
            self._changed.notify_all()

    def expect(self, request_id: str, callback: Callable[[dict[str, Any]], None]) -> None:
        with self._lock:
            self._pending[request_id] = callback

    def forget_pending(self) -> None:
        with self._lock:
            self._pending.clear()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        assert self.client is not None, "connect() first"
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise BenchError(f"publish to {topic} failed: {paho.error_string(info.rc)}")

    def request(
        self, topic: str, request_id: str, payload: bytes, timeout: float
    ) -> dict[str, Any]:
        """Publish and block until the reply to ``request_id`` arrives."""
        done = threading.Event()
        reply: dict[str, Any] = {}

        def answered(body: dict[str, Any]) -> None:
            reply.update(body)
            done.set()

        self.expect(request_id, answered)
        self.publish(topic, payload)
        if not done.wait(timeout):
            raise BenchError(f"no reply to {request_id} on {topic} within {timeout:g} s")
        return reply

    def wait_topic(
        self, topic: str, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        with self._changed:
            found = self._changed.wait_for(
                lambda: topic in self._latest and predicate(self._latest[topic]), timeout
            )
            if not found:
                raise BenchError(f"{what} (within {timeout:g} s); last: {self._latest.get(topic)}")
            return self._latest[topic]
