"""The state section of ``scripts/bench``: what the no-lost-update guarantee costs per invoke.

Handler state (``context.state``) is read as of when an invocation starts in its worker; its
write set commits (one SQLite transaction with the reply and the ``sync/delta``) while it
still holds the worker, and with ``concurrency > 1`` an optimistic check fails an invocation
whose keys changed since its snapshot with error type ``conflict`` (agent/contract/statecheck.py).

Over a real mosquitto and a real agent, started with the harness's ``Mosquitto`` and
``testing.bench.bench_agent`` (``runtime.max_workers`` raised to 20 so that every function
below keeps its warm workers), with ``WINDOW`` invokes in flight as in the MQTT throughput row:

- concurrency 1: ``stateless`` (``def handler(event): return event``), ``context`` (takes
  ``context``, touches no state: the snapshot is shipped, nothing commits) and ``counter``
  (``count += 1`` through ``context.state``), alternating in blocks; the target is the
  counter at >= 0.85x the stateless rate;
- concurrency 4: ``stateless`` again as the floor, the same counter (ok/s and conflict/s),
  and ``keyed``, whose invocations each touch their own key ``k<seq % 64>`` (4 in flight
  have 4 different keys, so the check should never fire), alternating in blocks.

Every counter reply is kept: the ok results must be exactly 1..N (no update lost, none
applied twice), and N is the number of ok counter replies in the run.

In local mode (``EdgeRuntime`` in this process with an in-memory ``EdgeSynchronizer()``),
one caller thread times warm ``invoke`` of the stateless, context and counter handlers in
interleaved blocks (concurrency 1), so the per-invocation cost of the state path shows.

Latencies: ``perf_counter_ns``, nearest rank. Over MQTT they are per request with the window
full (publish to its reply), so they mostly show queueing: ~WINDOW / rate.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agent import EdgeFunction, EdgeSynchronizer
from testing.bench import (
    ECHO_SOURCE,
    INVOKE_TOPIC,
    NODE,
    PREFIX,
    REPLY_TOPIC,
    STATE_TOPICS,
    STATUS_TOPIC,
    WINDOW,
    BenchError,
    Requester,
    bench_agent,
    children,
    info_row,
    invoke_body,
    latency_row_us,
    new_runtime,
    source_spec,
    time_calls,
    wait_until,
)
from testing.bench import latency_row as latency_row_ns
from testing.broker import Mosquitto

TITLE = (
    "Handler state consistency (agent/exec/context.py, agent/contract/statecheck.py): "
    "cost of the state path"
)

#: Target from issue 8, item 5: the state path costs at most 15% of stateless throughput.
STATE_OVER_STATELESS_MIN = 0.85
#: Workers: 3 functions x 1 + 3 functions x 4 + the prestarted interpreter, and headroom.
MAX_WORKERS = 20
KEYS = 64

CONTEXT_SOURCE = "def handler(event, context):\n    return event\n"
COUNTER_SOURCE = """\
def handler(event, context):
    n = (context.state.get("count") or 0) + 1
    context.state.set("count", n)
    return n
"""
KEYED_SOURCE = f"""\
def handler(event, context):
    key = "k%d" % (event["seq"] % {KEYS})
    n = (context.state.get(key) or 0) + 1
    context.state.set(key, n)
    return n
"""

#: function id -> (source, concurrency).
FUNCTIONS: dict[str, tuple[str, int]] = {
    "stateless1": (ECHO_SOURCE, 1),
    "context1": (CONTEXT_SOURCE, 1),
    "counter1": (COUNTER_SOURCE, 1),
    "stateless4": (ECHO_SOURCE, 4),
    "counter4": (COUNTER_SOURCE, 4),
    "keyed4": (KEYED_SOURCE, 4),
}
#: Both counters write the one key ``count``: their ok results together must be 1..N.
COUNTERS = frozenset({"counter1", "counter4"})
#: Every ok invoke of these is one new version of the node's state (one change).
WRITERS = COUNTERS | {"keyed4"}
DELTA_TOPIC = f"{PREFIX}/nodes/{NODE}/sync/delta"


# -- MQTT ------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Replies of one function over the blocks of a run."""

    seconds: float = 0.0
    ok: int = 0
    conflicts: int = 0
    latencies_us: list[float] = field(default_factory=list)

    @property
    def replies(self) -> int:
        return self.ok + self.conflicts


class StateBench:
    """The requester side: windows of invokes to one function, replies tallied by outcome."""

    def __init__(self, requester: Requester) -> None:
        self.requester = requester
        self.seq = 0
        #: Every ok result of the counters, warm-ups included (the lost-update check).
        self.counter_results: list[int] = []
        #: Ok invokes that changed the state, warm-ups included: the state's version.
        self.changes = 0

    def window(self, fid: str, total: int, window: int, tally: Tally | None = None) -> Tally:
        """``total`` invokes of ``fid``, at most ``window`` outstanding; first publish to last
        reply is added to ``tally.seconds``. Like bench_mqtt's window run, but for any function
        and counting ``conflict`` replies instead of failing on them."""
        tally = tally if tally is not None else Tally()
        bodies = [invoke_body(fid, self.seq + i) for i in range(total)]
        self.seq += total
        sent: dict[str, int] = {}
        slots = threading.Semaphore(window)
        finished = threading.Event()
        lock = threading.Lock()
        counts = {"replies": 0}
        failures: list[dict[str, Any]] = []
        clock = time.perf_counter_ns

        def answered(body: dict[str, Any]) -> None:
            now = clock()
            with lock:
                tally.latencies_us.append((now - sent[body["request_id"]]) / 1000)
                if body.get("ok"):
                    tally.ok += 1
                    if fid in COUNTERS:
                        self.counter_results.append(body["result"])
                    if fid in WRITERS:
                        self.changes += 1
                elif (body.get("error") or {}).get("type") == "conflict":
                    tally.conflicts += 1
                else:
                    failures.append(body)
                counts["replies"] += 1
                if counts["replies"] == total:
                    finished.set()
            slots.release()

        gc.collect()
        start = clock()
        for rid, body in bodies:
            if not slots.acquire(timeout=10):
                raise BenchError(f"no reply to {fid} freed a window slot within 10 s")
            with lock:
                sent[rid] = clock()
            self.requester.expect(rid, answered)
            self.requester.publish(INVOKE_TOPIC, body)
        if not finished.wait(30):
            raise BenchError(f"only {counts['replies']} of {total} replies from {fid} in 30 s")
        tally.seconds += (clock() - start) / 1e9
        if failures:
            raise BenchError(f"{len(failures)} invokes of {fid} failed, first: {failures[0]}")
        return tally

    def alternate(self, fids: tuple[str, ...], total: int, blocks: int = 5) -> dict[str, Tally]:
        """Each function ``total`` invokes in ``blocks`` alternating blocks, so machine noise
        hits all of them alike."""
        for fid in fids:  # warm-up, not counted
            self.window(fid, max(WINDOW, total // 20), WINDOW)
        tallies = {fid: Tally() for fid in fids}
        per_block = max(WINDOW, total // blocks)
        for _ in range(blocks):
            for fid in fids:
                self.window(fid, per_block, WINDOW, tallies[fid])
        return tallies


#: ``[outbox] delta_linger_ms`` of the agent (the default unless the environment says):
#: ``EDGE_BENCH_DELTA_LINGER_MS=0 scripts/bench state`` measures one delta per change.
DELTA_LINGER_MS = float(os.environ.get("EDGE_BENCH_DELTA_LINGER_MS", "20"))


def deploy(bench: StateBench, agent_pid: int) -> None:
    requester = bench.requester
    requester.wait_topic(
        STATUS_TOPIC, lambda m: m.get("status") == "online", 30, "the agent never said online"
    )
    for fid, (source, concurrency) in FUNCTIONS.items():
        spec = source_spec(fid, source, concurrency=concurrency)
        topic = f"{PREFIX}/nodes/{NODE}/functions/{fid}"
        requester.publish(topic, json.dumps(spec).encode(), retain=True)
    for fid in FUNCTIONS:
        requester.wait_topic(
            f"{PREFIX}/nodes/{NODE}/functions/{fid}/state",
            lambda m: m.get("state") == "active",
            30,
            f"function {fid} never became active",
        )
    # Start every warm worker now (a window wider than the concurrency makes the agent start
    # all of a function's workers); the prestart pool refills after the last cold start.
    workers = 1 + sum(concurrency for _, concurrency in FUNCTIONS.values())
    for _ in range(5):
        for fid, (_, concurrency) in FUNCTIONS.items():
            bench.window(fid, 8 * concurrency, 2 * concurrency)
        with contextlib.suppress(BenchError):
            wait_until(
                lambda: len(psutil.Process(agent_pid).children()) >= workers, 3, "workers", 0.02
            )
            return
    raise BenchError(
        f"the agent has {len(psutil.Process(agent_pid).children())} workers, not {workers}"
    )


def measure_mqtt(total: int) -> tuple[dict[str, Tally], list[int], int | None]:
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-state-")))
        broker = Mosquitto(workdir)
        broker.start()
        stack.callback(broker.stop)
        agent = bench_agent(
            workdir,
            broker.port,
            runtime={"max_workers": MAX_WORKERS},
            outbox={"delta_linger_ms": DELTA_LINGER_MS},
        )
        agent.start()
        stack.callback(agent.stop)
        requester = Requester(broker.port, [REPLY_TOPIC], [STATUS_TOPIC, STATE_TOPICS, DELTA_TOPIC])
        stack.callback(requester.close)
        requester.connect()
        bench = StateBench(requester)
        try:
            deploy(bench, agent.pid)
            tallies = bench.alternate(("stateless1", "context1", "counter1"), total)
            tallies |= bench.alternate(("stateless4", "counter4", "keyed4"), total)
        except BenchError as exc:
            raise BenchError(f"{exc}\nagent log:\n{agent.log_tail()}") from None
        # Every sync/delta up to the last change (the linger ends 20 ms after it).
        last = requester.wait_topic(
            DELTA_TOPIC,
            lambda m: m["to_version"] >= bench.changes,
            10,
            f"no sync/delta reached version {bench.changes}",
        )
        if last["to_version"] != bench.changes:
            raise BenchError(f"state at version {last['to_version']} after {bench.changes} changes")
        # ok: sync/delta messages received; conflicts: the versions they covered.
        tallies["deltas"] = Tally(ok=requester.received[DELTA_TOPIC], conflicts=bench.changes)
        requester.close()
        agent.stop()
        return tallies, bench.counter_results, agent.returncode
    raise AssertionError("unreachable")  # for mypy: ExitStack may swallow exceptions


def mqtt_rows(tallies: dict[str, Tally], counter_results: list[int]) -> list[dict[str, Any]]:
    def row(name: str, fid: str, floor: Tally | None, **extra: Any) -> dict[str, Any]:
        tally = tallies[fid]
        out = latency_row_us(name, tally.latencies_us, key=fid, seconds=round(tally.seconds, 3))
        rate = tally.ok / tally.seconds
        out.update(rate=round(rate, 1), ok=tally.ok, conflicts=tally.conflicts, **extra)
        if floor is not None:
            ratio = rate / (floor.ok / floor.seconds)
            out.update(ratio_to_stateless=round(ratio, 3))
        return out

    s1, s4 = tallies["stateless1"], tallies["stateless4"]
    stateless1 = row(
        f"stateless `handler(event)`, concurrency 1, {WINDOW} in flight", "stateless1", None
    )
    stateless1["ratio"] = "1x"
    context1 = row("takes `context`, no state access, concurrency 1", "context1", s1)
    context1["ratio"] = f"{context1['ratio_to_stateless']:.2f}x stateless c=1"
    counter1 = row("counter (`count += 1` via `context.state`), concurrency 1", "counter1", s1)
    ratio1 = counter1["ratio_to_stateless"]
    counter1.update(
        ratio=f"{ratio1:.2f}x stateless c=1",
        target=f"state c=1 >= {STATE_OVER_STATELESS_MIN:g}x stateless c=1",
        passed=ratio1 >= STATE_OVER_STATELESS_MIN,
    )
    stateless4 = row(
        f"stateless `handler(event)`, concurrency 4, {WINDOW} in flight", "stateless4", None
    )
    stateless4["ratio"] = f"1x (c=1: {stateless4['rate'] / (s1.ok / s1.seconds):.2f}x)"

    c4 = tallies["counter4"]
    share = c4.conflicts / c4.replies
    counter4 = row("counter, concurrency 4: ok", "counter4", s4, conflict_share=round(share, 4))
    counter4["ratio"] = f"{counter4['ratio_to_stateless']:.2f}x stateless c=4"
    counter4["note"] = f"{c4.conflicts:,} of {c4.replies:,} replies were `conflict`"
    conflict_rate = c4.conflicts / c4.seconds
    conflicts4 = info_row(
        "counter, concurrency 4: `conflict` replies",
        key="counter4_conflicts",
        n=c4.replies,
        rate=round(conflict_rate, 1),
        ratio=f"{100 * share:.1f}% of replies",
        conflict_share=round(share, 4),
    )
    k4 = tallies["keyed4"]
    keyed4 = row(f"own key `k<seq % {KEYS}>` per invoke, concurrency 4", "keyed4", s4)
    keyed4["ratio"] = f"{keyed4['ratio_to_stateless']:.2f}x stateless c=4"
    keyed4["note"] = f"{k4.conflicts} conflicts"
    if k4.conflicts:
        keyed4["ratio"] += f", {k4.conflicts} conflict(s)"

    expected = list(range(1, len(counter_results) + 1))
    intact = sorted(counter_results) == expected
    lost = info_row(
        "counters' ok results are exactly 1..N (N = ok counter replies, warm-ups included)",
        key="no_lost_update",
        n=len(counter_results),
        target="no lost or doubled update",
        passed=intact,
    )
    deltas = tallies["deltas"]
    per = deltas.ok / max(1, deltas.conflicts)
    merged = info_row(
        f"`sync/delta` messages per state change (`outbox.delta_linger_ms` {DELTA_LINGER_MS:g})",
        key="deltas_per_change",
        n=deltas.conflicts,
    )
    merged.update(
        ratio=f"{per:.3f} ({deltas.ok:,} deltas for {deltas.conflicts:,} changes)",
        deltas=deltas.ok,
        changes=deltas.conflicts,
    )
    return [stateless1, context1, counter1, stateless4, counter4, conflicts4, keyed4, lost, merged]


# -- local mode ------------------------------------------------------------------------------


def _local_handlers() -> dict[str, Callable[..., Any]]:
    # Nested, so cloudpickle ships them by value: the worker need not import this module.
    def stateless(event: Any) -> Any:
        return event

    def with_context(event: Any, context: Any) -> Any:
        return event

    def counter(event: Any, context: Any) -> Any:
        n = (context.state.get("count") or 0) + 1
        context.state.set("count", n)
        return n

    return {"stateless": stateless, "context": with_context, "counter": counter}


def measure_local(count: int, warmup: int, blocks: int = 10) -> dict[str, list[int]]:
    sync = EdgeSynchronizer()
    samples: dict[str, list[int]] = {}
    with new_runtime(max_invocations=1 << 30, synchronizer=sync) as runtime:
        for name, handler in _local_handlers().items():
            runtime.deploy(EdgeFunction(id=name, name=name, handler=handler))
            samples[name] = []

        def call(name: str) -> Callable[[int], object]:
            return lambda i: runtime.invoke(name, i)

        per_block = max(1, count // blocks)
        for block in range(blocks):
            for name in samples:
                samples[name] += time_calls(call(name), per_block, warmup if block == 0 else 20)
        total = warmup + 20 * (blocks - 1) + per_block * blocks
        state = sync.get_local_state()
        if state is None or state.data.get("count") != total:
            raise BenchError(f"local counter: {total} invokes left {state}")
    return samples


def local_rows(samples: dict[str, list[int]]) -> list[dict[str, Any]]:
    stateless = latency_row_ns(
        "local: warm `EdgeRuntime.invoke`, stateless handler", samples["stateless"], key="local"
    )
    stateless["ratio"] = "1x"
    rows = [stateless]
    for name, label in (
        ("context", "local: takes `context`, no state access"),
        ("counter", "local: counter via `context.state` (in-memory EdgeSynchronizer)"),
    ):
        row = latency_row_ns(label, samples[name], key=f"local_{name}")
        over = row["p50_us"] - stateless["p50_us"]
        row.update(
            ratio=f"{row['p50_us'] / stateless['p50_us']:.2f}x stateless p50, {over:+.1f} µs",
            p50_over_stateless_us=round(over, 2),
        )
        rows.append(row)
    return rows


# -- the section -----------------------------------------------------------------------------


def run(quick: bool = False) -> dict[str, Any]:
    scale = 10 if quick else 1
    total = 5_000 // scale
    local_n = 5_000 // scale
    load_before = os.getloadavg()
    started = time.monotonic()

    tallies, counter_results, returncode = measure_mqtt(total)
    load_mid = os.getloadavg()
    local = measure_local(local_n, warmup=max(100, local_n // 10))
    rows = [*mqtt_rows(tallies, counter_results), *local_rows(local)]
    seconds = time.monotonic() - started

    c4 = tallies["counter4"]
    notes = [
        f"MQTT rows: {total:,} invokes per function after a warm-up, at most {WINDOW} "
        "outstanding (QoS 1 both ways), the functions of each concurrency group alternating "
        "in 5 blocks; rate = ok replies / summed block time. p50/p99 are publish-to-reply "
        f"times with the window full (mostly queueing, about {WINDOW} / rate). Agent: "
        f"bench_mqtt's config (durability normal: SQLite WAL, synchronous=NORMAL) plus "
        f"runtime.max_workers {MAX_WORKERS}; every function's workers are warm before timing.",
        "Per ok invoke the counter commits its write set, its reply and a `sync/delta` in one "
        "SQLite transaction (group commit) and publishes the reply; the delta waits "
        f"`outbox.delta_linger_ms` = {DELTA_LINGER_MS:g} ms for the next changes to merge into "
        "it (0: one delta message per change); the stateless "
        "handler commits only its reply (the dedupe row). The `context` row ships the "
        "snapshot to the worker but commits no state: the difference between it and the "
        "counter is the commit, the delta and the check.",
        f"Concurrency 4: all {c4.replies:,} counter invokes read and write `count`, so of 4 "
        f"running at once only the first to commit succeeds ({100 * c4.conflicts / c4.replies:.0f}"
        "% `conflict`; a conflict writes nothing and costs a reply). The keyed handler's 4 "
        f"running invokes nearly always have distinct keys (`k<seq % {KEYS}>`, seq "
        f"consecutive; {tallies['keyed4'].conflicts} conflicts in {tallies['keyed4'].replies:,}"
        "), so its row is the check's cost without conflicts.",
        f"Local rows: one caller thread, {local_n:,} warm invokes each, the three handlers "
        "interleaved in 10 blocks, EdgeRuntime with EdgeSynchronizer() in memory (no SQLite).",
        f"Load average (1 min) {load_before[0]:.2f} before, {load_mid[0]:.2f} after the MQTT "
        f"rows, {os.getloadavg()[0]:.2f} at the end, on {os.cpu_count()} CPUs; section took "
        f"{seconds:.1f} s.",
    ]
    if returncode != 0:
        notes.append(f"WARNING: the agent exited with {returncode} on SIGTERM")
    leaked = children()
    if leaked:
        notes.append(f"LEAK: child processes still alive after closing: {leaked}")
    return {
        "title": TITLE,
        "rows": rows,
        "notes": notes,
        "leaked_children": leaked,
        "load_avg": {
            "before": list(load_before),
            "after_mqtt": list(load_mid),
            "after": list(os.getloadavg()),
        },
    }


if __name__ == "__main__":
    import sys

    result = run("--quick" in sys.argv)
    for row in result["rows"]:
        print({k: v for k, v in row.items() if v is not None and not isinstance(v, list)})
    for note in result["notes"]:
        print(note)
