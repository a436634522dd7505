"""fleet-sim: many simulated gateways on one broker, each a real MQTT 5 connection.

    scripts/fleet-sim 1000 --port 1883 --heartbeat 10

One node's behaviour is :class:`testing.sim_node.SimNode`; this module is the fleet (one
selector thread driving every node), :func:`sim_fleet` for tests and the CLI. The simulator
lives here, in the harness, so tests (:func:`sim_fleet`) and benchmarks
(``scripts/fleet_sim.py``, a thin entry point to :func:`main`) share one implementation; it
must never start a broker itself (:mod:`testing.broker` does that).

Every simulated node speaks the wire contract the way ``edge-agent`` does, through the
agent's own protocol code: ``Topics`` (subscriptions, ``classify``, ``reply_topic``), the
status / heartbeat / function state / reply encoders, ``decode_spec``,
``spec_fingerprint`` (a re-delivered spec is a no-op), ``requires_met``, ``code_bytes`` and
``agent.exec.bundles.sha256_hex`` (the digest is checked before anything else), and
``decode_invoke`` (a bad request gets a ``bad_request`` reply). It has a Last Will (the
retained ``offline`` status), publishes ``online`` on connect and heartbeats every
``--heartbeat`` seconds (with an ``interval_s`` extra so controllers know its rhythm).

What is simulated rather than real: deploying checks the spec and its bytes, compiles a
source bundle (a syntax error is ``failed``) or looks for the entrypoint's module in a zip,
but runs nothing; a spec whose ``environment`` has ``FLEET_SIM_FAIL`` set to ``all`` or to a
comma list naming the node ``failed`` too. An invocation of an active function answers
``{"node_id", "function_id", "version", "echo": payload}``; a payload
``{"sim_error": "<type>"}`` answers that error type instead; an unknown function is
``function_not_found``.

Why paho directly and not ``agent.mqtt.MqttClient``: MqttClient runs one network thread per
connection (``loop_start``), and a thousand threads each waking for keepalives costs more
than the simulation itself. Here one selector thread drives every client through paho's
external-loop API (``loop_read`` / ``loop_write`` / ``loop_misc`` and the socket
open/close/register-write callbacks).

What a node owes is delivered the way the agent delivers it (its outbox and PUBACK
watchdog): its retained status and its function-state reports are tracked by packet id until
the broker's PUBACK, and one not acknowledged within ``--resend`` seconds (jittered, doubling
up to 30 s) is published again on the same selector loop, the unacknowledged copy dropped from
paho's queue; a newer report on the same topic replaces an owed one, and a reconnect
publishes the status again. A clustered broker (NATS electing JetStream leaders, or just busy)
may drop or never acknowledge a QoS 1 publish, and MQTT itself resends only after a
reconnect. Heartbeats (QoS 0) and replies (the controller asks again) are not tracked.

Signals (for benchmarks): SIGUSR1 switches every node to ``--fast-heartbeat``, SIGUSR2
back to ``--heartbeat``; SIGINT/SIGTERM stop cleanly (each node publishes ``offline``).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import random
import resource
import selectors
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import paho.mqtt.client as paho

from testing.sim_node import SimNode

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (children inherit it); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class SimFleet:
    """N simulated nodes driven by one selector thread (``start``/``stop``; thread-safe API)."""

    def __init__(
        self,
        host: str,
        port: int,
        count: int,
        *,
        prefix: str = "edge",
        heartbeat_s: float = 10.0,
        fast_heartbeat_s: float = 1.0,
        capabilities: Iterable[str] = ("python",),
        id_format: str = "sim-{:04d}",
        first: int = 0,
        keepalive: int = 30,
        seed: int | None = None,
        brokers: Iterable[tuple[str, int]] = (),
        protocol: str = "5",
        resend_s: float = 3.0,
    ) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        #: The nodes of a clustered broker: simulated nodes spread over them by index.
        self.brokers = list(brokers) or [(host, port)]
        self.protocol = protocol
        self.heartbeat_s = heartbeat_s
        self.normal_heartbeat_s = heartbeat_s
        self.fast_heartbeat_s = fast_heartbeat_s
        self.keepalive = keepalive
        self.rng = random.Random(seed)
        self._capabilities = list(capabilities)
        self._ids = [id_format.format(i) for i in range(first, first + count)]
        self._index = {node_id: i for i, node_id in enumerate(self._ids)}
        self.nodes: dict[str, SimNode] = {}
        self.stopping = False
        self.heartbeats_sent = 0
        #: seconds without a PUBACK before an owed retained publish goes again (then doubling)
        self.resend_s = resend_s
        self.resent = 0  # owed publishes sent again
        self.acked = 0  # owed publishes acknowledged
        self.refused = 0  # subscriptions the broker refused (each asked for again)
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, str, SimNode]] = []
        self._timer_seq = itertools.count()
        self._hb_due: dict[str, float] = {}
        self._commands: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        self._connected = 0
        self._all_connected = threading.Event()
        self._stopped = threading.Event()
        self._stop_deadline = 0.0

    # -- thread-safe API ---------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Connect every node (in the loop thread); returns once all are connected."""
        self._thread = threading.Thread(target=self._run, name="fleet-sim", daemon=True)
        self._thread.start()
        self.call(lambda: self._add(self._ids))
        if not self._all_connected.wait(timeout):
            raise TimeoutError(
                f"fleet-sim: {self._connected} of {len(self._ids)} nodes connected in {timeout}s"
            )

    def endpoint_for(self, node_id: str) -> tuple[str, int]:
        """The broker node a simulated node connects to (round robin over ``brokers``)."""
        if len(self.brokers) == 1:
            return self.brokers[0]
        return self.brokers[self._index.get(node_id, len(self._index)) % len(self.brokers)]

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (which owns every client)."""
        self._commands.append(fn)
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"x")

    def add_nodes(self, node_ids: Iterable[str]) -> None:
        ids = list(node_ids)
        self.call(lambda: self._add(ids))

    def kill(self, node_id: str) -> None:
        """Drop the node's TCP connection without DISCONNECT: the broker fires its Will."""

        def kill() -> None:
            node = self.nodes[node_id]
            node.dead = True
            sock = node.client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]

        self.call(kill)

    def mute(self, node_id: str, muted: bool = True) -> None:
        """Pause (or resume) a node's heartbeats while it stays connected."""

        def mute() -> None:
            node = self.nodes[node_id]
            node.muted = muted
            if not muted:
                self.schedule_heartbeat(node, 0.0)

        self.call(mute)

    def set_heartbeat(self, interval_s: float) -> None:
        def change() -> None:
            self.heartbeat_s = interval_s
            now = time.monotonic()
            for node in self.nodes.values():  # spread evenly over the new interval
                self._hb_due[node.node_id] = now + self.rng.uniform(0, interval_s)
                self.push_timer(self._hb_due[node.node_id], "hb", node)

        self.call(change)

    def stop(self, timeout: float = 10.0) -> None:
        """Every node publishes ``offline`` and disconnects; the loop thread ends."""
        self.call(self._begin_stop)
        self._stopped.wait(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop thread ---------------------------------------------------------------------

    def _add(self, ids: list[str]) -> None:
        for node_id in ids:
            node = SimNode(self, node_id, self._capabilities)
            self.nodes[node_id] = node
            try:
                node.connect()
            except OSError:
                self.schedule_reconnect(node)

    def push_timer(self, due: float, what: str, node: SimNode) -> None:
        heapq.heappush(self._timers, (due, next(self._timer_seq), what, node))

    def schedule_heartbeat(self, node: SimNode, delay: float) -> None:
        due = time.monotonic() + delay
        self._hb_due[node.node_id] = due
        self.push_timer(due, "hb", node)

    def stats(self) -> dict[str, int]:
        """Counters for benchmarks (read from any thread: plain ints, a snapshot)."""
        owed = sum(len(node.owed) for node in list(self.nodes.values()))
        return {
            "connected": self._connected,
            "heartbeats_sent": self.heartbeats_sent,
            "owed_acked": self.acked,
            "owed_resent": self.resent,
            "owed_now": owed,
            "subscriptions_refused": self.refused,
        }

    def schedule_reconnect(self, node: SimNode) -> None:
        self.push_timer(time.monotonic() + self.rng.uniform(0.2, 1.0), "reconnect", node)

    def on_node_connected(self, node: SimNode) -> None:
        self._connected += 1
        if self._connected >= len(self._ids):
            self._all_connected.set()

    def on_node_disconnected(self, node: SimNode) -> None:
        self._connected -= 1

    def _on_socket_open(self, client: paho.Client, node: SimNode, sock: Any) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._selector.register(sock, _READ, node)

    def _on_socket_close(self, client: paho.Client, node: SimNode, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    def _on_register_write(self, client: paho.Client, node: SimNode, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, _READ | _WRITE, node)

    def _on_unregister_write(self, client: paho.Client, node: SimNode, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, _READ, node)

    def _begin_stop(self) -> None:
        self.stopping = True
        for node in self.nodes.values():
            if node.connected:
                node.client.publish(node.topics.status, node._status("offline"), qos=1, retain=True)
                node.client.disconnect()
        self._stop_deadline = time.monotonic() + 5.0

    def _run(self) -> None:
        self._selector.register(self._wake_r, _READ, None)
        next_misc = time.monotonic() + 1.0
        try:
            while True:
                now = time.monotonic()
                if self.stopping and (
                    len(self._selector.get_map()) <= 1 or now > self._stop_deadline
                ):
                    return
                due = self._timers[0][0] if self._timers else now + 0.5
                timeout = max(0.0, min(due, next_misc, now + 0.5) - now)
                for key, mask in self._selector.select(timeout):
                    node = key.data
                    if node is None:
                        self._run_commands()
                        continue
                    client = node.client
                    if mask & _READ:
                        client.loop_read()
                    if mask & _WRITE and client.socket() is not None:
                        client.loop_write()
                self._run_timers(time.monotonic())
                if time.monotonic() >= next_misc:
                    next_misc = time.monotonic() + 1.0
                    for node in list(self.nodes.values()):
                        if node.client.socket() is not None:
                            node.client.loop_misc()
        finally:
            for node in self.nodes.values():  # whatever did not close in time
                sock = node.client.socket()
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()
            self._stopped.set()

    def _run_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while self._commands:
            self._commands.popleft()()

    def _run_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            due, _, what, node = heapq.heappop(self._timers)
            if what == "hb":
                if self._hb_due.get(node.node_id) != due:
                    continue  # rescheduled since
                if node.connected and not self.stopping:
                    self._hb_due[node.node_id] = due + self.heartbeat_s
                    self.push_timer(due + self.heartbeat_s, "hb", node)
                    if not node.muted:
                        node.heartbeat()
                        self.heartbeats_sent += 1
            elif what.startswith("resub"):
                if what == f"resub{node.connection}" and not self.stopping:
                    node.resubscribe()
            elif what == "resend":
                if node.resend_due == due and not self.stopping:
                    node.resend(now)
            elif what == "reconnect" and not node.dead and not self.stopping:
                try:
                    node.client.reconnect()
                except OSError:
                    self.schedule_reconnect(node)


@contextlib.contextmanager
def sim_fleet(port: int, count: int, **kwargs: Any) -> Iterator[SimFleet]:
    """``count`` simulated gateways (sim-0000, ...) connected to the broker on ``port``."""
    fleet = SimFleet("127.0.0.1", port, count, **kwargs)
    fleet.start(timeout=30)
    try:
        yield fleet
    finally:
        fleet.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fleet-sim", description="Simulate N edge-agent gateways on an MQTT broker."
    )
    parser.add_argument("count", type=int, help="how many nodes")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--prefix", default="edge")
    parser.add_argument("--heartbeat", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument(
        "--fast-heartbeat", type=float, default=1.0, help="seconds, after SIGUSR1 (default 1)"
    )
    parser.add_argument("--capabilities", default="python", help="comma list (default python)")
    parser.add_argument("--id-format", default="sim-{:04d}", help="node ids (default sim-0000)")
    parser.add_argument("--first", type=int, default=0, help="number of the first node")
    parser.add_argument(
        "--brokers", default="", help="host:port,... of a clustered broker (spread over them)"
    )
    parser.add_argument("--protocol", choices=("5", "3.1.1"), default="5", help="MQTT version")
    parser.add_argument(
        "--resend",
        type=float,
        default=3.0,
        help="seconds without a PUBACK before a retained status/state goes again (default 3)",
    )
    parser.add_argument(
        "--stats-every",
        type=float,
        default=0.0,
        help="print a JSON line of counters every N seconds (default 0: only at the end)",
    )
    args = parser.parse_args(argv)
    brokers = [(h, int(p)) for h, _, p in (e.rpartition(":") for e in args.brokers.split(",") if e)]
    raise_nofile_limit()
    fleet = SimFleet(
        args.host,
        args.port,
        args.count,
        prefix=args.prefix,
        heartbeat_s=args.heartbeat,
        fast_heartbeat_s=args.fast_heartbeat,
        capabilities=[c for c in args.capabilities.split(",") if c],
        id_format=args.id_format,
        first=args.first,
        brokers=brokers,
        protocol=args.protocol,
        resend_s=args.resend,
    )
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: fleet.set_heartbeat(fleet.fast_heartbeat_s))
    signal.signal(signal.SIGUSR2, lambda *_: fleet.set_heartbeat(fleet.normal_heartbeat_s))
    started = time.monotonic()
    fleet.start()
    ready = {"ready": args.count, "seconds": round(time.monotonic() - started, 3)}
    print(json.dumps(ready), flush=True)
    every = args.stats_every
    next_stats = time.monotonic() + every
    while not stop.wait(min(1.0, every) if every > 0 else 1.0):
        if every > 0 and time.monotonic() >= next_stats:
            next_stats += every
            print(json.dumps({"stats": fleet.stats()}), flush=True)
    fleet.stop()
    print(json.dumps({"stopped": True, **fleet.stats()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
