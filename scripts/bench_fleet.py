"""The fleet section of ``scripts/bench``: the controller against 1,000 simulated gateways.

Everything runs on 127.0.0.1: a private mosquitto (``set_tcp_nodelay true``,
``max_queued_messages 100000``, no persistence) on a free port, started after this process
raised RLIMIT_NOFILE's soft limit to the hard limit (1,000 client sockets, and the broker
inherits the limit); ``scripts/fleet_sim.py 1000`` in its own process (one selector thread,
one real MQTT 5 connection per node, heartbeats every 10 s, 1 s after SIGUSR1); and the
controller (``EdgeCluster.connect``) in this process, so its CPU and RSS are this process's.

Rows:

- rollout: ``deploy_to_all`` of a source function to 1,000 nodes until every node's retained
  function state says active for that version and sha256 (``wait_for_rollout``); target
  <= 10 s. One sample per version deployed (quick 1, full 3);
- heartbeat ingestion at 1,000 nodes x 10 s (100/s) and at 1,000/s (the simulator switched
  to 1 s heartbeats): controller CPU (process CPU time / wall time), heartbeats ingested per
  second against the rate the simulator sent, RSS growth over the window after a warm-up;
  target at 1,000/s: ingests >= 95% of what was sent with its queue drained, RSS growth
  < 5 MB;
- ``edgectl nodes`` with 1,000 nodes: a new process from exec to table printed (the user's
  wait), and the API call alone in this process (connect, ingest every retained message,
  ``list_nodes``), plus ``list_nodes`` on a connected cluster.

Everything started here is stopped in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from testing.broker import Mosquitto, NatsCluster, nats_server_version
from testing.fleet_sim import raise_nofile_limit
from testing.ports import free_port

TITLE = "Fleet controller (agent/cloud) against 1,000 simulated gateways (scripts/fleet_sim.py)"

ROOT = Path(__file__).resolve().parent.parent
NODES = 1000
ROLLOUT_TARGET_S = 10.0
RSS_GROWTH_MAX_MB = 5.0
MB = 1024 * 1024


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError(f"bench_fleet: the simulator said nothing within {timeout}s")
    return proc.stdout.readline()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def _measure_ingest(cluster: Any, sim: psutil.Process, seconds: float) -> dict[str, float]:
    me = psutil.Process()
    view = cluster.controller.view
    sent_before = _sim_heartbeats(cluster)
    rss_before = me.memory_info().rss
    cpu_before = sum(me.cpu_times()[:2])
    sim_cpu_before = sum(sim.cpu_times()[:2])
    hb_before = view.counts["heartbeat"]
    started = time.monotonic()
    time.sleep(seconds)  # measuring a window, not waiting for an event
    wall = time.monotonic() - started
    ingested = view.counts["heartbeat"] - hb_before
    return {
        "wall_s": wall,
        "cpu_percent": 100 * (sum(me.cpu_times()[:2]) - cpu_before) / wall,
        "sim_cpu_percent": 100 * (sum(sim.cpu_times()[:2]) - sim_cpu_before) / wall,
        "ingested_per_s": ingested / wall,
        "sent_per_s": (_sim_heartbeats(cluster) - sent_before) / wall,
        "rss_mb": me.memory_info().rss / MB,
        "rss_growth_mb": (me.memory_info().rss - rss_before) / MB,
        "queue": float(cluster.controller._events.qsize()),
    }


def _sim_heartbeats(cluster: Any) -> int:
    """Heartbeats the simulator has sent, per the nodes' own ``seq`` numbers."""
    with cluster.controller._cond:
        return sum(
            int(rec.heartbeat["seq"])
            for rec in cluster.controller.view.records.values()
            if rec.heartbeat is not None
        )


def run(quick: bool) -> dict[str, Any]:
    from agent.cloud import function_spec
    from agent.local.cluster import EdgeCluster

    nofile = raise_nofile_limit()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    port = free_port()
    procs: list[subprocess.Popen[Any]] = []
    broker: Mosquitto | None = None
    rows: list[dict[str, Any]] = []
    notes: list[str] = [f"RLIMIT_NOFILE soft limit {nofile} (raised to the hard limit)"]
    extra: dict[str, Any] = {}
    cluster: Any = None
    try:
        broker = Mosquitto(work, port).start()
        started = time.monotonic()
        sim = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "scripts" / "fleet_sim.py"),
                str(NODES),
                "--port",
                str(port),
                "--heartbeat",
                "10",
                "--fast-heartbeat",
                "1",
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        procs.append(sim)
        ready = _readline(sim, 120)
        notes.append(f"{NODES} simulated nodes connected in {time.monotonic() - started:.1f}s")
        cluster = EdgeCluster.connect("127.0.0.1", port, heartbeat_interval_s=10.0, timeout=30)
        assert len(cluster.list_nodes()) == NODES, ready

        # -- rollout -------------------------------------------------------------------------
        source = work / "thermo.py"
        durations = []
        for attempt in range(1 if quick else 3):
            source.write_text(f"VERSION = {attempt}\n\ndef handler(e):\n    return e\n")
            spec = function_spec(source, id="thermo", version=f"b{attempt}")
            t0 = time.monotonic()
            targeted = cluster.deploy_to_all(spec)
            report = cluster.wait_for_rollout(spec, timeout=60)
            durations.append(time.monotonic() - t0)
            if not report.ok or targeted != NODES:
                notes.append(f"rollout {attempt}: {targeted} targeted, {report.counts()}")
        worst = max(durations)
        rows.append(
            {
                "name": f"rollout: deploy_to_all -> {NODES} nodes active",
                "n": len(durations),
                "p50_us": _pct(durations, 0.5) * 1e6,
                "p99_us": worst * 1e6,
                "rate": NODES / _pct(durations, 0.5),
                "target": f"<= {ROLLOUT_TARGET_S:g} s",
                "passed": worst <= ROLLOUT_TARGET_S,
                "note": "rate = nodes/s",
            }
        )

        # -- edgectl nodes -------------------------------------------------------------------
        samples = 3 if quick else 7
        cli, api, listing = [], [], []
        for _ in range(samples):
            t0 = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "agent.cloud.ctl", "--broker", f"127.0.0.1:{port}", "nodes"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=False,
            )
            cli.append(time.monotonic() - t0)
            if done.returncode != 0 or f"{NODES} nodes" not in done.stdout:
                notes.append(f"edgectl nodes failed ({done.returncode}): {done.stderr[-300:]}")
            t0 = time.monotonic()
            with EdgeCluster.connect("127.0.0.1", port, timeout=30) as probe:
                assert len(probe.list_nodes()) == NODES
                api.append(time.monotonic() - t0)
            t0 = time.perf_counter()
            cluster.list_nodes()
            listing.append(time.perf_counter() - t0)
        for name, values in (
            (f"edgectl nodes, {NODES} nodes: exec to table printed", cli),
            ("API alone: connect + ingest retained + list_nodes", api),
            ("list_nodes() on a connected cluster", listing),
        ):
            rows.append(
                {
                    "name": name,
                    "n": len(values),
                    "p50_us": _pct(values, 0.5) * 1e6,
                    "p99_us": max(values) * 1e6,
                    "passed": None,
                }
            )

        # -- heartbeat ingestion -------------------------------------------------------------
        sim_ps = psutil.Process(sim.pid)
        slow = _measure_ingest(cluster, sim_ps, 10.0 if quick else 30.0)
        rows.append(
            {
                "name": f"ingest heartbeats, {NODES} nodes x 10 s: controller CPU",
                "n": round(slow["ingested_per_s"] * slow["wall_s"]),
                "rate": slow["ingested_per_s"],
                "ratio": f"{slow['cpu_percent']:.1f}% CPU",
                "passed": None,
                "note": f"RSS {slow['rss_mb']:.0f} MB",
            }
        )
        sim.send_signal(signal.SIGUSR1)
        time.sleep(3.0)  # the simulator spreads the new rhythm over one interval; warm up
        fast = _measure_ingest(cluster, sim_ps, 15.0 if quick else 60.0)
        keeps_up = fast["ingested_per_s"] >= 0.95 * fast["sent_per_s"] and fast["queue"] < 1000
        rows.append(
            {
                "name": "ingest heartbeats at ~1,000/s: controller CPU, keeps up",
                "n": round(fast["ingested_per_s"] * fast["wall_s"]),
                "rate": fast["ingested_per_s"],
                "ratio": f"{fast['cpu_percent']:.1f}% CPU",
                "target": "ingested >= 95% of sent, queue drained",
                "passed": keeps_up,
                "note": f"sent {fast['sent_per_s']:.0f}/s, queue {fast['queue']:.0f}",
            }
        )
        rows.append(
            {
                "name": "ingest at ~1,000/s: controller RSS growth over the window",
                "n": round(fast["wall_s"]),
                "ratio": f"{fast['rss_growth_mb']:+.1f} MB (RSS {fast['rss_mb']:.0f} MB)",
                "target": f"< {RSS_GROWTH_MAX_MB:g} MB",
                "passed": fast["rss_growth_mb"] < RSS_GROWTH_MAX_MB,
            }
        )
        notes.append(
            f"simulator CPU: {slow['sim_cpu_percent']:.0f}% at 100 heartbeats/s, "
            f"{fast['sim_cpu_percent']:.0f}% at {fast['sent_per_s']:.0f}/s "
            f"(one process, one thread, {NODES} connections)"
        )
        extra = {"ingest_slow": slow, "ingest_fast": fast, "rollout_s": durations}
    finally:
        if cluster is not None:
            cluster.close()
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    leftovers = [p.pid for p in psutil.Process().children(recursive=True) if p.is_running()]
    if leftovers:
        notes.append(f"child processes left running: {leftovers}")
    return {"rows": rows, "notes": notes, **extra, "pid": os.getpid()}


# -- scale: 10,000 simulated nodes (issue 13) -------------------------------------------------


def _broker_floor(port: int, count: int = 50_000, size: int = 600) -> dict[str, float]:
    """The broker's raw rate on this machine: one paho publisher, one subscriber, ``count``
    messages of ``size`` bytes at QoS 0 and at QoS 1; messages/s received."""
    return {f"qos{qos}_per_s": _floor_rate(port, qos, count, size) for qos in (0, 1)}


def _floor_rate(port: int, qos: int, count: int, size: int) -> float:
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    got = 0
    done, subscribed = threading.Event(), threading.Event()

    def on_message(c: Any, u: Any, m: Any) -> None:
        nonlocal got
        got += 1
        if got >= count:
            done.set()

    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"floor-sub-{qos}")
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    sub.subscribe("floor/x", qos=qos)
    subscribed.wait(10)
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"floor-pub-{qos}")
    pub.max_inflight_messages_set(1000)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    body = b"x" * size
    t0 = time.monotonic()
    for _ in range(count):
        pub.publish("floor/x", body, qos=qos)
    done.wait(120)
    elapsed = time.monotonic() - t0
    for client in (pub, sub):
        client.disconnect()
        client.loop_stop()
    return got / elapsed


def run_scale(nodes: int = 10_000, sims: int = 4, heartbeat_s: float = 30.0) -> dict[str, Any]:
    """``nodes`` simulated gateways in ``sims`` fleet-sim processes on one mosquitto (its
    file limit raised): connect, controller start, a rollout to all, heartbeat ingestion at
    ``nodes / heartbeat_s`` per second, ``edgectl nodes``, and the broker's raw rate."""
    from agent.cloud import function_spec
    from agent.local.cluster import EdgeCluster

    nofile = raise_nofile_limit()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    port = free_port()
    procs: list[subprocess.Popen[Any]] = []
    broker: Mosquitto | None = None
    result: dict[str, Any] = {"nodes": nodes, "sims": sims, "nofile": nofile}
    cluster: Any = None
    try:
        broker = Mosquitto(
            work, port, "max_connections -1\n", max_queued_messages=1_000_000
        ).start()
        t0 = time.monotonic()
        per = nodes // sims
        sim_procs = []
        for i in range(sims):
            count = per if i < sims - 1 else nodes - per * (sims - 1)
            sim_procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "scripts" / "fleet_sim.py"),
                        str(count),
                        "--port",
                        str(port),
                        "--heartbeat",
                        str(heartbeat_s),
                        "--first",
                        str(i * per),
                        "--id-format",
                        "sim-{:05d}",
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                )
            )
        procs.extend(sim_procs)
        for sim in sim_procs:
            _readline(sim, 600)
        result["connect_s"] = time.monotonic() - t0

        t0 = time.monotonic()
        cluster = EdgeCluster.connect(
            "127.0.0.1", port, heartbeat_interval_s=heartbeat_s, timeout=120
        )
        result["controller_start_s"] = time.monotonic() - t0
        result["nodes_seen"] = len(cluster.list_nodes())

        source = work / "thermo.py"
        source.write_text("VERSION = 1\n\ndef handler(e):\n    return e\n")
        spec = function_spec(source, id="thermo", version="s1")
        t0 = time.monotonic()
        targeted = cluster.deploy_to_all(spec)
        report = cluster.wait_for_rollout(spec, timeout=300)
        result["rollout_s"] = time.monotonic() - t0
        result["rollout_targeted"] = targeted
        result["rollout_counts"] = dict(report.counts())

        me = psutil.Process()
        view = cluster.controller.view
        hb0, cpu0, t0 = view.counts["heartbeat"], sum(me.cpu_times()[:2]), time.monotonic()
        sim_cpu0 = sum(sum(psutil.Process(s.pid).cpu_times()[:2]) for s in sim_procs)
        assert broker.proc is not None
        broker_ps = psutil.Process(broker.proc.pid)
        broker_cpu0 = sum(broker_ps.cpu_times()[:2])
        time.sleep(heartbeat_s * 2)  # measuring a window, not waiting for an event
        wall = time.monotonic() - t0
        result["ingest"] = {
            "window_s": wall,
            "heartbeats_per_s": (view.counts["heartbeat"] - hb0) / wall,
            "expected_per_s": nodes / heartbeat_s,
            "controller_cpu_percent": 100 * (sum(me.cpu_times()[:2]) - cpu0) / wall,
            "broker_cpu_percent": 100 * (sum(broker_ps.cpu_times()[:2]) - broker_cpu0) / wall,
            "sims_cpu_percent": 100
            * (sum(sum(psutil.Process(s.pid).cpu_times()[:2]) for s in sim_procs) - sim_cpu0)
            / wall,
            "controller_rss_mb": me.memory_info().rss / MB,
            "offline_now": len([n for n in cluster.list_nodes() if n.status.value == "offline"]),
        }

        timings = []
        for args in (["--json", "nodes"], ["nodes"]):
            t0 = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "agent.cloud.ctl", "--broker", f"127.0.0.1:{port}", *args],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=False,
            )
            timings.append((" ".join(args), time.monotonic() - t0, done.returncode))
        result["edgectl_nodes"] = timings
        result["broker_floor"] = _broker_floor(port)
    finally:
        if cluster is not None:
            cluster.close()
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    return result


# -- 1,000 nodes on the 3-node NATS cluster (issue 13) ----------------------------------------


def _nats_floor(
    brokers: list[str], count: int, size: int = 600, timeout: float = 60.0
) -> dict[str, Any]:
    """The NATS cluster's raw rate on this machine, timeboxed: one paho MQTT 3.1.1 publisher on
    the first node, one subscriber on the last (so through a cluster route), ``count``
    messages of ``size`` bytes at QoS 0 -> QoS 0 and QoS 1 -> QoS 1, messages/s received;
    and QoS 1 retained publishes to distinct topics (what a node's status is), PUBACKs/s."""
    out: dict[str, Any] = {"messages": count, "bytes": size}
    for qos in (0, 1):
        out[f"qos{qos}"] = _nats_flow(brokers[0], brokers[-1], qos, count, size, timeout)
    out["retained_qos1"] = _nats_retained(brokers[0], count, size, timeout)
    return out


def _mqtt311(name: str, endpoint: str) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    host, _, port = endpoint.rpartition(":")
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{name}-{os.getpid()}-{time.monotonic_ns() % 100000}",
        protocol=paho.MQTTv311,
    )
    client.max_inflight_messages_set(1000)
    client.connect(host, int(port), keepalive=30)
    client.loop_start()
    return client


def _nats_flow(
    pub_at: str, sub_at: str, qos: int, count: int, size: int, timeout: float
) -> dict[str, Any]:
    import threading

    got = 0
    first = last = 0.0
    done, subscribed = threading.Event(), threading.Event()
    topic = f"floor/q{qos}/{os.getpid()}"

    def on_message(c: Any, u: Any, m: Any) -> None:
        nonlocal got, last
        got += 1
        last = time.monotonic()
        if got >= count:
            done.set()

    sub = _mqtt311("floor-sub", sub_at)
    sub.on_message = on_message
    sub.on_subscribe = lambda c, u, mid, rcs, p: (
        subscribed.set() if all(not r.is_failure for r in rcs) else None
    )
    sub.subscribe(topic, qos=qos)
    ok = subscribed.wait(20)
    pub = _mqtt311("floor-pub", pub_at)
    time.sleep(0.5)  # the subscription's interest reaches the other node (NATS routes)
    body = b"x" * size
    first = time.monotonic()
    try:
        if ok:
            for _ in range(count):
                pub.publish(topic, body, qos=qos)
            done.wait(timeout)
    finally:
        for client in (pub, sub):
            client.disconnect()
            client.loop_stop()
    elapsed = (last or time.monotonic()) - first
    return {"subscribed": ok, "received": got, "per_s": round(got / elapsed, 1) if got else 0.0}


def _nats_retained(pub_at: str, count: int, size: int, timeout: float) -> dict[str, Any]:
    import threading

    acked = 0
    last = 0.0
    done = threading.Event()

    def on_publish(c: Any, u: Any, mid: int, rc: Any, p: Any) -> None:
        nonlocal acked, last
        acked += 1
        last = time.monotonic()
        if acked >= count:
            done.set()

    pub = _mqtt311("floor-ret", pub_at)
    pub.on_publish = on_publish
    body = b"x" * size
    first = time.monotonic()
    try:
        for i in range(count):
            pub.publish(f"floor/retained/{i}", body, qos=1, retain=True)
        done.wait(timeout)
    finally:
        pub.disconnect()
        pub.loop_stop()
    elapsed = (last or time.monotonic()) - first
    return {"acked": acked, "per_s": round(acked / elapsed, 1) if acked else 0.0}


class _SimOutput:
    """Reads fleet-sim's JSON lines (ready, stats every few seconds, stopped) in a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        import threading

        self.proc = proc
        self.ready = threading.Event()
        self.lines: list[dict[str, Any]] = []
        threading.Thread(target=self._read, name="sim-output", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(line))
                if "ready" in self.lines[-1]:
                    self.ready.set()

    def last(self, key: str) -> dict[str, Any] | None:
        for line in reversed(self.lines):
            if key in line:
                return line
        return None


def _statuses_seen(cluster: Any) -> tuple[int, int]:
    """(nodes whose status the controller has read, nodes it knows from anything)."""
    controller = cluster.controller
    with controller._cond:
        records = list(controller.view.records.values())
    return sum(1 for r in records if "status_ts" in r.node.metadata), len(records)


def _nats_cpu(nats: Any) -> float:
    return sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in nats.procs if p is not None)


def run_nats_scale(
    nodes: int = 1000,
    heartbeat_s: float = 10.0,
    *,
    floor_messages: int = 5000,
    see_all_timeout: float = 180.0,
    rollout_timeout: float = 180.0,
    consumer_replicas: int | None = None,
) -> dict[str, Any]:
    """``nodes`` simulated gateways (MQTT 3.1.1) spread over a 3-node NATS cluster started
    here (the harness's ``testing.broker.NatsCluster``), each phase timeboxed (a phase that
    runs out is reported with what it reached, and the run goes on):

    - the broker floor on the idle cluster, and again under the fleet at the end;
    - the simulator connected (``fleet-sim --brokers ... --protocol 3.1.1``; it publishes a
      retained status again until NATS PUBACKs it);
    - the controller (``view_qos=0``, as docs/scaling.md recommends on NATS): its start, then
      until it has read every node's status (polled; times to 50/90/99/100%);
    - a rollout to every node (``deploy_to_all``, ``wait_for_rollout`` over all ids);
    - heartbeat ingestion over 3 intervals against ``nodes / heartbeat_s``, controller, NATS
      and simulator CPU;
    - ``edgectl --json nodes`` (new process, a fresh replay of the retained statuses) x 3,
      with how many nodes each listed.

    ``consumer_replicas`` (NATS's ``mqtt { consumer_replicas }``; default: NATS's own, the
    stream's 3 here): every QoS 1 subscription of every MQTT client is a JetStream consumer,
    by default replicated with its own Raft group, and an agent has five. The work dir (NATS
    logs) is kept when a phase fell short; its path is in the result."""
    from agent.cloud import function_spec
    from agent.local.cluster import EdgeCluster

    raise_nofile_limit()
    work = Path(tempfile.mkdtemp(prefix="bench-nats-"))
    nats = NatsCluster(work)
    if consumer_replicas is not None:
        for conf in nats.confs:
            text = conf.read_text().replace(
                "ack_wait:", f"consumer_replicas: {consumer_replicas}\n  ack_wait:"
            )
            conf.write_text(text)
    result: dict[str, Any] = {
        "nodes": nodes,
        "broker": "nats 3-node cluster",
        "consumer_replicas": consumer_replicas or "default",
        "short": [],
    }
    short: list[str] = result["short"]
    ids = [f"sim-{i:04d}" for i in range(nodes)]
    sim: subprocess.Popen[str] | None = None
    cluster: Any = None
    me = psutil.Process()
    try:
        nats.start()
        result["nats_version"] = nats_server_version()
        result["floor_idle"] = _nats_floor(nats.brokers, floor_messages)

        t0 = time.monotonic()
        sim = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "scripts" / "fleet_sim.py"),
                str(nodes),
                "--brokers",
                ",".join(nats.brokers),
                "--protocol",
                "3.1.1",
                "--heartbeat",
                str(heartbeat_s),
                "--stats-every",
                "5",
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        out = _SimOutput(sim)
        if not out.ready.wait(300):
            short.append("the simulator did not connect every node in 300 s")
            raise RuntimeError(f"fleet-sim not ready: {out.lines[-1:]}")
        result["connect_s"] = round(time.monotonic() - t0, 2)

        t0 = time.monotonic()
        cluster = EdgeCluster.connect(
            brokers=nats.brokers,
            protocol="3.1.1",
            heartbeat_interval_s=heartbeat_s,
            timeout=120,
            view_qos=0,
        )
        result["controller_start_s"] = round(time.monotonic() - t0, 2)
        result["statuses_at_start"] = _statuses_seen(cluster)[0]
        marks: dict[str, float] = {}
        deadline = time.monotonic() + see_all_timeout
        while True:
            seen, known = _statuses_seen(cluster)
            for pct in (50, 90, 99, 100):
                if f"{pct}%" not in marks and seen * 100 >= pct * nodes:
                    marks[f"{pct}%"] = round(time.monotonic() - t0, 2)
            if seen >= nodes or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        result["see_all"] = {
            "statuses_seen": seen,
            "nodes_known": known,
            "seconds_from_controller_connect": marks,
            "sim": out.last("stats"),
        }
        if seen < nodes:
            short.append(f"the controller read {seen} of {nodes} statuses in {see_all_timeout}s")

        source = work / "thermo.py"
        source.write_text("def handler(e):\n    return e\n")
        spec = function_spec(source, id="thermo", version="n1")
        t0 = time.monotonic()
        try:  # the spec publish waits 30 s for its PUBACK: report that, and go on
            result["rollout_targeted"] = cluster.deploy_to_all(spec)
        except Exception as exc:
            short.append(f"rollout: {type(exc).__name__}: {exc}")
        else:
            report = cluster.wait_for_rollout(spec, ids, timeout=rollout_timeout)
            result["rollout_s"] = round(time.monotonic() - t0, 2)
            result["rollout_counts"] = dict(report.counts())
            result["rollout_timed_out"] = report.timed_out
            if report.counts().get("active", 0) < nodes:
                short.append(f"rollout: {dict(report.counts())} after {result['rollout_s']}s")

        view = cluster.controller.view
        sim_ps = psutil.Process(sim.pid)
        hb0, t0 = view.counts["heartbeat"], time.monotonic()
        cpu0, nats0, sim0 = sum(me.cpu_times()[:2]), _nats_cpu(nats), sum(sim_ps.cpu_times()[:2])
        time.sleep(heartbeat_s * 3)  # measuring a window, not waiting for an event
        wall = time.monotonic() - t0
        result["ingest"] = {
            "window_s": round(wall, 1),
            "heartbeats_per_s": round((view.counts["heartbeat"] - hb0) / wall, 1),
            "expected_per_s": nodes / heartbeat_s,
            "controller_cpu_percent": round(100 * (sum(me.cpu_times()[:2]) - cpu0) / wall, 1),
            "nats_cpu_percent_3_nodes": round(100 * (_nats_cpu(nats) - nats0) / wall, 1),
            "sim_cpu_percent": round(100 * (sum(sim_ps.cpu_times()[:2]) - sim0) / wall, 1),
            "controller_rss_mb": round(me.memory_info().rss / MB),
        }

        timings = []
        for _ in range(3):
            t0 = time.monotonic()
            try:
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "agent.cloud.ctl",
                        "--broker",
                        ",".join(nats.brokers),
                        "--protocol",
                        "3.1.1",
                        "--json",
                        "nodes",
                    ],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    check=False,
                    timeout=120,
                )
            except subprocess.TimeoutExpired:
                timings.append({"s": None, "rc": "timeout", "nodes": None})
                continue
            listed = None
            with contextlib.suppress(ValueError, TypeError):
                listed = len(json.loads(done.stdout))
            timings.append(
                {"s": round(time.monotonic() - t0, 2), "rc": done.returncode, "nodes": listed}
            )
        result["edgectl_nodes_json"] = timings
        if any(t["nodes"] != nodes for t in timings):
            short.append(f"edgectl --json nodes listed {[t['nodes'] for t in timings]}")
        result["floor_loaded"] = _nats_floor(nats.brokers, floor_messages)
        result["sim"] = out.last("stats")
    except Exception as exc:  # a phase that broke: report how far it got
        short.append(f"{type(exc).__name__}: {exc}")
    finally:
        if cluster is not None:
            cluster.close()
        if sim is not None and sim.poll() is None:
            sim.terminate()
            try:
                sim.wait(30)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait(5)
        nats.stop()
        if short:  # keep the NATS logs (nats-<i>.log), not the JetStream stores (~0.5 GB)
            for store in work.glob("nats-js-*"):
                shutil.rmtree(store, ignore_errors=True)
            result["work_dir_kept"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "nats":  # nats [nodes] [consumer replicas]
        wanted = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
        replicas = int(sys.argv[3]) if len(sys.argv) > 3 else None
        result = run_nats_scale(wanted, consumer_replicas=replicas)
        print(json.dumps(result, indent=2, default=str))
    else:
        wanted = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
        processes = int(sys.argv[2]) if len(sys.argv) > 2 else 4
        print(json.dumps(run_scale(wanted, processes), indent=2, default=str))
