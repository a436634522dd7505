"""The state-sync section of ``scripts/bench``: bytes on the wire and mirror convergence.

Bytes (no broker; the agent's own store and encoder): 1,000 changes to 10 keys (each a small
sensor reading, deterministic) are committed with :meth:`agent.store.Store.sync_commit` into
three fresh SQLite stores in one run, and what would go on the wire is measured:

- coalesced: all changes made while nothing could be sent (``coalesce_after_id=0``, the
  outbox pump's view while disconnected): the outbox holds one ``sync/delta``;
- one delta per change: the same commits with coalescing off (every delta already handed
  to MQTT), i.e. what a connected agent sends;
- full copies: what the seed sent, ``json.dumps({"type": "update", "version": v, "data":
  state})`` per change.

Each row gives payload bytes and MQTT 5 PUBLISH packet bytes (fixed header, topic, packet
id, empty properties, payload); a mirror fed the deltas checks they rebuild the state.

Convergence (a real agent and mosquitto on 127.0.0.1, as in the MQTT section): a function
``bump`` (concurrency 4) writes one of 10 keys per invocation. Per repetition the cloud
publishes N invokes, each held in its handler by a gate file until the agent has received
all N (the heartbeat's ``inflight``); then the broker is frozen (SIGSTOP), the gate opens,
and the agent commits all N changes while none of its publishes is acknowledged (it still
counts as connected: the outbox keeps handing up to 64 messages to paho, later deltas
coalesce). After the last commit the broker is resumed (SIGCONT) and the time until the
``MirrorClient`` holds the agent's final version is measured. p50 over the repetitions.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.cloud.mirror import MirrorClient, SyncMirror
from agent.contract import protocol
from agent.models import state_checksum
from agent.mqtt import MqttSettings
from agent.store import Store
from testing.agent_process import AgentProcess
from testing.bench import BenchError, info_row, source_spec, wait_until
from testing.bench import latency_row_us as latency_row
from testing.broker import Mosquitto
from testing.cloud import nodelay

TITLE = (
    "State sync (agent/store/state.py, agent/edge/statesync.py, agent/cloud/mirror.py): "
    "wire bytes, convergence"
)

ROOT = Path(__file__).resolve().parent.parent
NODE = "gw-sync-bench"
PREFIX = "edge"
BASE = f"{PREFIX}/nodes/{NODE}"
DELTA_TOPIC = f"{BASE}/sync/delta"
CHANGES = 1_000
KEYS = 10
NEVER = 1 << 62

BUMP_SOURCE = """\
import os
import time


def handler(event, context):
    while not os.path.exists(event['gate']):
        time.sleep(0.002)
    i = event['i']
    context.state.set('sensor-%d' % (i % 10), {'value': event['value'], 'unit': 'C', 'seq': i})
"""


# -- bytes ------------------------------------------------------------------------------------


def publish_packet_bytes(topic: str, payload: bytes) -> int:
    """Size of an MQTT 5 QoS 1 PUBLISH carrying ``payload`` (no properties)."""
    variable = 2 + len(topic.encode()) + 2 + 1  # topic, packet id, properties length (0)
    remaining = variable + len(payload)
    length_bytes = 1
    while remaining >= 128**length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


def sensor_changes(count: int) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(20261127)
    return [
        (f"sensor-{i % KEYS}", {"value": round(rng.uniform(15.0, 30.0), 2), "unit": "C", "seq": i})
        for i in range(count)
    ]


def commit_all(
    store: Store, changes: list[tuple[str, dict[str, Any]]], coalesce_after_id: int
) -> list[float]:
    samples = []
    for key, value in changes:
        started = time.perf_counter_ns()
        store.sync_commit(
            {key: value},
            delta_topic=DELTA_TOPIC,
            encode_delta=protocol.encode_sync_delta,
            coalesce_after_id=coalesce_after_id,
        )
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


def check_mirror(payloads: list[bytes], expected: tuple[int, dict[str, Any]]) -> None:
    mirror = SyncMirror()
    for payload in payloads:
        if mirror.on_message(DELTA_TOPIC, payload):
            raise BenchError("the mirror asked for a snapshot while fed the deltas in order")
    got = mirror.get(NODE)
    if got is None or (got.version, got.data) != expected or not got.verify():
        raise BenchError(f"the mirror did not rebuild the state: {got} != {expected}")


def measure_bytes(workdir: Path) -> dict[str, Any]:
    changes = sensor_changes(CHANGES)
    out: dict[str, Any] = {}
    for mode, after in (("coalesced", 0), ("per_change", NEVER)):
        with Store(workdir / f"{mode}.db") as store:
            out[f"{mode}_commit_us"] = commit_all(store, changes, after)
            payloads = [i.payload for i in store.outbox_peek(CHANGES + 1)]
            expected = store.sync_state()
        check_mirror(payloads, expected)
        out[mode] = (len(payloads), payloads)
    state: dict[str, Any] = {}
    full: list[bytes] = []
    for version, (key, value) in enumerate(changes, start=1):
        state[key] = value
        full.append(json.dumps({"type": "update", "version": version, "data": state}).encode())
    out["full"] = (len(full), full)
    out["final_checksum"] = state_checksum(state)
    return out


def bytes_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    full_payload = sum(len(p) for p in result["full"][1])
    rows = []
    for key, name in (
        ("coalesced", f"{CHANGES:,} changes to {KEYS} keys made offline: coalesced delta(s)"),
        ("per_change", "the same changes as one delta per change (no coalescing)"),
        ("full", "the same changes as full copies per change (the seed's updates)"),
    ):
        count, payloads = result[key]
        payload_bytes = sum(len(p) for p in payloads)
        wire_bytes = sum(publish_packet_bytes(DELTA_TOPIC, p) for p in payloads)
        row = info_row(
            name,
            key=f"bytes_{key}",
            n=count,
            ratio=f"{payload_bytes:,} B, {100 * payload_bytes / full_payload:.2f}% of full copies",
            note=f"{payload_bytes:,} B payload, {wire_bytes:,} B as MQTT 5 PUBLISH packets",
            payload_bytes=payload_bytes,
            wire_bytes=wire_bytes,
            messages=count,
        )
        if key == "coalesced":
            row["target"] = "1 message"
            row["passed"] = count == 1
        rows.append(row)
    rows.append(
        latency_row(
            "sync_commit while offline (coalescing into the queued delta)",
            result["coalesced_commit_us"],
            key="commit_coalesced",
        )
    )
    rows.append(
        latency_row(
            "sync_commit, a new delta per change",
            result["per_change_commit_us"],
            key="commit_per_change",
        )
    )
    return rows


# -- convergence ------------------------------------------------------------------------------


class Cloud:
    """Publishes invokes; keeps the latest heartbeat, counts replies and deltas."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.heartbeat: dict[str, Any] = {}
        self.status: dict[str, Any] = {}
        self.states: dict[str, str] = {}
        self.replies = 0
        self.deltas: list[bytes] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-sync-cloud-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.max_inflight_messages_set(0)  # unbounded: a burst goes out at once
        self.client.on_socket_open = nodelay
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()

    def connect(self) -> Cloud:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        self.client.subscribe(
            [
                (f"{BASE}/heartbeat", 0),
                (f"{BASE}/status", 1),
                (f"{BASE}/replies", 1),
                (f"{BASE}/functions/+/state", 1),
                (DELTA_TOPIC, 1),
            ]
        )
        if not self._subscribed.wait(10):
            raise BenchError("the bench cloud got no SUBACK within 10 s")
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if not msg.payload:
            return
        with self._lock:
            if msg.topic == DELTA_TOPIC:
                self.deltas.append(bytes(msg.payload))
                return
            body = json.loads(msg.payload)
            if msg.topic.endswith("/heartbeat"):
                self.heartbeat = body
            elif msg.topic.endswith("/status"):
                self.status = body
            elif msg.topic.endswith("/replies"):
                self.replies += 1
            elif msg.topic.endswith("/state"):
                self.states[body["function_id"]] = body["state"]

    def publish(self, topic: str, body: Any, *, retain: bool = False) -> paho.MQTTMessageInfo:
        return self.client.publish(topic, json.dumps(body).encode(), qos=1, retain=retain)


def sync_agent(workdir: Path, port: int) -> AgentProcess:
    """The section's agent (not started): a 1 s heartbeat, warning logs, room for a burst."""
    base = {
        "node": {"id": NODE, "capabilities": ["python"]},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "agent": {
            "state_dir": str(workdir / "state"),
            "heartbeat_interval_s": 1.0,
            "log_level": "warning",
        },
        # the daemon refuses invokes past max_workers * 2 + max_queue accepted at once
        "runtime": {"max_workers": 4, "max_queue": 2 * CHANGES},
    }
    return AgentProcess(workdir, port, NODE, base=base)


def stored_version(agent: AgentProcess) -> int:
    """The state version in the agent's own database (read while it runs)."""
    with Store(agent.state_dir / "state.db") as store:
        return store.sync_state()[0]


def one_burst(
    broker: Mosquitto,
    cloud: Cloud,
    agent: AgentProcess,
    mirror: MirrorClient,
    workdir: Path,
    n: int,
) -> dict[str, Any]:
    assert broker.proc is not None
    base = stored_version(agent)
    gate = workdir / f"gate-{uuid.uuid4().hex[:8]}"
    rng = random.Random(n + base)
    replies_before = cloud.replies
    deltas_before = len(cloud.deltas)
    infos = [
        cloud.publish(
            f"{BASE}/invoke",
            {
                "request_id": uuid.uuid4().hex,
                "function_id": "bump",
                "payload": {"i": i, "gate": str(gate), "value": round(rng.uniform(15, 30), 2)},
            },
        )
        for i in range(n)
    ]
    for info in infos:
        info.wait_for_publish(10)
    wait_until(
        lambda: cloud.heartbeat.get("inflight") == n,
        15,
        f"the agent never held all {n} invokes at once (heartbeat inflight)",
        0.02,
    )
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        gate.touch()
        committed_at = time.monotonic()
        wait_until(
            lambda: stored_version(agent) == base + n,
            60,
            f"the agent did not commit {n} changes while the broker was frozen",
            0.01,
        )
        commit_s = time.monotonic() - committed_at
    finally:
        resumed = time.monotonic()
        os.kill(broker.proc.pid, signal.SIGCONT)
    state = mirror.mirror.wait_for(NODE, lambda s: s.version >= base + n, 30)
    converged = time.monotonic()
    if state is None:
        raise BenchError(f"the mirror never reached version {base + n}: {mirror.get(NODE)}")
    wait_until(lambda: cloud.replies - replies_before >= n, 30, f"{n} replies did not arrive")
    with Store(agent.state_dir / "state.db") as store:
        version, data = store.sync_state()
    if (state.version, state.data) != (version, data):
        raise BenchError(f"the mirror converged to {state} but the agent has {version} {data}")
    deltas = cloud.deltas[deltas_before:]
    return {
        "converge_us": (converged - resumed) * 1e6,
        "commit_s": commit_s,
        "deltas": len(deltas),
        "delta_bytes": sum(len(d) for d in deltas),
    }


def measure_convergence(workdir: Path, n: int, reps: int) -> list[dict[str, Any]]:
    bursts: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        # max_inflight_messages 0: hold every invoke of a burst at once
        broker = Mosquitto(workdir, extra="max_inflight_messages 0\n")
        broker.start()
        stack.callback(broker.stop)
        agent = sync_agent(workdir, broker.port)
        agent.start()
        stack.callback(agent.stop)
        cloud = Cloud(broker.port).connect()
        stack.callback(cloud.close)
        mirror = MirrorClient(
            MqttSettings(port=broker.port, client_id=f"bench-mirror-{uuid.uuid4().hex[:8]}"),
            nodes=[NODE],
        ).start()
        stack.callback(mirror.stop)
        try:
            wait_until(lambda: cloud.status.get("status") == "online", 30, "agent not online")
            spec = source_spec("bump", BUMP_SOURCE, concurrency=4, timeout_seconds=120)
            cloud.publish(f"{BASE}/functions/bump", spec, retain=True).wait_for_publish(10)
            wait_until(lambda: cloud.states.get("bump") == "active", 30, "bump never active")
            one_burst(broker, cloud, agent, mirror, workdir, 8)  # warm-up: workers started
            for _ in range(reps):
                bursts.append(one_burst(broker, cloud, agent, mirror, workdir, n))
        except BenchError as exc:
            raise BenchError(f"{exc}\nagent log:\n{agent.log_tail()}") from None
    return bursts


# -- section ----------------------------------------------------------------------------------


def run(quick: bool = False) -> dict[str, Any]:
    started = time.monotonic()
    n = 200 if quick else CHANGES
    reps = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        workdir = Path(tmp)
        sizes = measure_bytes(workdir)
        bursts = measure_convergence(workdir, n, reps)
    rows = bytes_rows(sizes)
    sized = {r["key"]: r for r in rows if "payload_bytes" in r}
    deltas = [b["deltas"] for b in bursts]
    rows.append(
        latency_row(
            f"mirror converged after the broker resumed ({n} changes made while frozen)",
            [b["converge_us"] for b in bursts],
            key="converge",
            note=f"deltas on the wire per burst: {deltas}; agent commit time "
            + ", ".join(f"{b['commit_s']:.2f}" for b in bursts)
            + " s",
            deltas=deltas,
            delta_bytes=[b["delta_bytes"] for b in bursts],
        )
    )
    notes = [
        "Bytes (payload / as MQTT 5 PUBLISH packets): "
        + ", ".join(
            f"{sized[k]['messages']:,} message(s) {sized[k]['payload_bytes']:,} B"
            f" / {sized[k]['wire_bytes']:,} B {what}"
            for k, what in (
                ("bytes_coalesced", "coalesced"),
                ("bytes_per_change", "one delta per change"),
                ("bytes_full", "full copies"),
            )
        )
        + ".",
        f"Bytes: {CHANGES:,} deterministic sensor readings ({{value, unit, seq}}) to {KEYS} keys, "
        "committed through Store.sync_commit and encoded by "
        "agent.contract.protocol.encode_sync_delta; "
        "the full-copy row is the seed's json.dumps({type, version, data}) per change. "
        "A SyncMirror fed each row's deltas rebuilt the final state (checksum "
        f"{sizes['final_checksum'][:12]}...).",
        f"Convergence: {reps} bursts of {n} invokes (+1 warm-up of 8) through a real agent "
        "(max_workers 4, function concurrency 4) and mosquitto (max_inflight_messages 0). "
        "The broker is SIGSTOPped once the agent holds all invokes, so the agent stays "
        "'connected': its outbox hands the first 64 messages (about half replies, half "
        "deltas) to paho and later changes coalesce into the next unsent delta, hence "
        "about 33 deltas per burst. An agent that knows it is offline (connection lost) "
        "coalesces everything into one (tests/test_sync_daemon.py). Timed from SIGCONT to "
        "the MirrorClient holding the final version; the replies drain after that. With "
        "few samples the p99 column shows the max. Section took "
        f"{time.monotonic() - started:.1f} s.",
    ]
    return {"title": TITLE, "rows": rows, "notes": notes}


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    result = run(quick)
    for row in result["rows"]:
        print({k: v for k, v in row.items() if v is not None})
    for note in result["notes"]:
        print(note)
