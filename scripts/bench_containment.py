"""The containment section of ``scripts/bench``: what the tree-memory sampler costs.

The sampler (agent/exec/pool/sampler.py) scans /proc every 0.25 s for the processes of every
function uid it watches. Measured here, in this process, as root:

- the CPU of one scan with 8 busy processes under one function uid (Debian's python3
  spinning), and the share of one core that is at the default interval; the floor is a
  scan with nothing to find (the cost of walking /proc on this machine);
- warm ``EdgeRuntime.invoke`` p50 with the sampler stopped and running (watching those 8
  busy processes at 10x the default rate, to make any effect visible), in interleaved blocks;
- the slip: how much memory one process can touch within one interval, i.e. how far over
  ``memory_mb`` a tree can get before the next scan sees it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from typing import Any

from agent import EdgeFunction
from agent.exec.pool.sampler import DEFAULT_INTERVAL_S, TreeSampler
from testing.bench import info_row, latency_row, new_runtime, time_calls

TITLE = "Containment: the tree-memory sampler (agent/exec/pool/sampler.py)"

UID = 61990  # the end of the default function range: no test uses it
SPIN = "while True: pass"


def identity(x: Any) -> Any:
    """The handler of the latency rows (this section's own: sections never import each other)."""
    return x


def _spinners(n: int) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            ["/usr/bin/python3", "-c", SPIN], user=UID, group=UID, extra_groups=[], cwd="/"
        )
        for _ in range(n)
    ]


def _scan_cpu_us(sampler: TreeSampler, scans: int) -> list[float]:
    out = []
    for _ in range(scans):
        started = time.thread_time()
        sampler.scan_once()
        out.append((time.thread_time() - started) * 1e6)
    return out


def run(quick: bool = False) -> dict[str, Any]:
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"):
        return {"rows": [], "notes": ["skipped: needs root and /usr/bin/python3"]}
    scans = 50 if quick else 400
    rows: list[dict[str, Any]] = []
    sampler = TreeSampler(lambda *a: None, lambda uid: {})
    sampler.watch("idle", UID + 1, 64)
    floor = sorted(_scan_cpu_us(sampler, scans))
    rows.append(_cpu_row("scan, nothing of the uid running (floor)", floor, None))
    spinners = _spinners(8)
    try:
        sampler.unwatch(UID + 1)
        sampler.watch("busy", UID, 1 << 20)  # a huge budget: measure, never kill
        busy = sorted(_scan_cpu_us(sampler, scans))
        rows.append(_cpu_row("scan, 8 busy processes of the uid", busy, floor))
        rows.extend(_latency_rows(sampler, 500 if quick else 5000))
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
    rows.append(_slip_row())
    return {
        "rows": rows,
        "notes": [
            f"Scans: {scans} per row; CPU is the scanning thread's own (thread_time). The "
            f"share of one core is CPU per scan / the default interval "
            f"({DEFAULT_INTERVAL_S:g} s). /proc held {len(os.listdir('/proc'))} entries.",
            "Slip: a tree can exceed memory_mb by what its processes touch between two scans "
            "before the kill (RLIMIT_DATA still caps each process's private memory).",
            "Latency rows: warm EdgeRuntime.invoke of an identity handler, sampler stopped vs "
            "running every 25 ms (10x the default rate) over 8 spinning processes, "
            "interleaved in 10 blocks.",
        ],
    }


def _cpu_row(name: str, samples: list[float], floor: list[float] | None) -> dict[str, Any]:
    p50 = statistics.median(samples)
    share = p50 / 1e6 / DEFAULT_INTERVAL_S * 100
    ratio = f"{p50 / statistics.median(floor):.2f}x floor, " if floor else ""
    return info_row(
        name,
        n=len(samples),
        p50_us=p50,
        p99_us=samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        ratio=f"{ratio}{share:.2f}% of a core at {DEFAULT_INTERVAL_S:g} s",
    )


def _latency_rows(sampler: TreeSampler, count: int) -> list[dict[str, Any]]:
    runtime = new_runtime()
    runtime.deploy(EdgeFunction(id="f", name="f", handler=identity))
    sampler.interval_s = DEFAULT_INTERVAL_S / 10
    off: list[int] = []
    on: list[int] = []
    try:
        for block in range(10):
            if block % 2:
                sampler.start()
                on += time_calls(lambda i: runtime.invoke("f", i), count // 10, 50)
                sampler.stop()
                sampler._stop.clear()  # the bench reuses one sampler
            else:
                off += time_calls(lambda i: runtime.invoke("f", i), count // 10, 50)
    finally:
        runtime.close()
    off_row = latency_row("warm invoke, sampler stopped (floor)", off)
    on_row = latency_row("warm invoke, sampler scanning 8 busy processes every 25 ms", on)
    on_row["ratio"] = f"{on_row['p50_us'] / off_row['p50_us']:.2f}x floor"
    on_row["target"] = "p50 <= 1.1x floor"
    on_row["passed"] = on_row["p50_us"] <= 1.1 * off_row["p50_us"]
    return [off_row, on_row]


def _slip_row() -> dict[str, Any]:
    """How many MiB one process touches in one interval: what a scan can miss."""
    size = 256 << 20
    started = time.perf_counter()
    block = bytearray(size)  # zero-filled: every page touched
    elapsed = time.perf_counter() - started
    del block
    rate_mib_s = (size >> 20) / elapsed
    return info_row(
        "slip: memory one process can touch between two scans",
        n=1,
        ratio=f"{rate_mib_s * DEFAULT_INTERVAL_S:.0f} MiB per {DEFAULT_INTERVAL_S:g} s "
        f"({rate_mib_s:.0f} MiB/s)",
    )
