"""Invocation metrics (the seed's ``EdgeMetrics``) and the node's system metrics.

Memory is bounded: per function, exact counters plus a ring of the last ``window`` latencies
for percentiles; the record log itself is a bounded deque. Thread-safe.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: Latencies kept per function for percentiles.
DEFAULT_WINDOW = 1024
#: Records kept in ``EdgeMetrics.records``.
DEFAULT_HISTORY = 10_000


@dataclass(slots=True)
class InvocationRecord:
    """One invocation's outcome: the seed's fields, in the seed's order with its defaults,
    then edge-agent's (all defaulted).

    ``timestamp`` is when the record was made (the invocation's end), a naive local
    ``datetime.now()`` as in the seed and like ``EdgeNode.last_heartbeat``, so the two
    compare. ``start_time`` is when the invocation started, epoch seconds; left out it is
    ``timestamp`` minus ``duration_ms``. ``error`` is ``""`` on success; ``None`` is taken
    for it and stored as ``""``.
    """

    function_id: str
    node_id: str
    duration_ms: float
    success: bool
    timestamp: datetime = field(default_factory=datetime.now)
    error: str = ""
    start_time: float | None = None
    request_id: str | None = None
    cold_start: bool = False
    #: Peak RSS of the worker that ran it, KiB (the worker's lifetime peak so far).
    peak_rss_kb: int = 0
    #: Wire error type (``timeout``, ``memory_exceeded``, ...) when it failed.
    error_type: str | None = None

    def __post_init__(self) -> None:
        if self.error is None:  # the agent's callers said "no error" with None before
            self.error = ""  # type: ignore[unreachable]
        if self.start_time is None:
            self.start_time = self.timestamp.timestamp() - self.duration_ms / 1000


def success_record(
    function_id: str,
    node_id: str,
    start_time: float,
    duration_ms: float,
    request_id: str | None,
    cold_start: bool,
    peak_rss_kb: int,
) -> InvocationRecord:
    """A successful invocation's record, made now: equal to ``InvocationRecord(...)`` with
    these as keywords, for the once-per-invocation path (by position, in the fields' order:
    binding eight keywords to the dataclass's eleven-parameter ``__init__`` costs as much
    as the rest of making it)."""
    return InvocationRecord(
        function_id,
        node_id,
        duration_ms,
        True,
        datetime.now(),
        "",
        start_time,
        request_id,
        cold_start,
        peak_rss_kb,
    )


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(slots=True)
class _FunctionStats:
    invocations: int = 0
    errors: int = 0
    timeouts: int = 0
    cold_starts: int = 0
    total_ms: float = 0.0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=DEFAULT_WINDOW))
    #: node_id -> [invocations, errors], for the seed's ``node_id`` filters.
    by_node: dict[str, list[int]] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "invocations": self.invocations,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "cold_starts": self.cold_starts,
            "success_rate": _rate(self.invocations, self.errors),
            "avg_latency_ms": self.total_ms / self.invocations if self.invocations else 0.0,
            "p50_ms": percentile(ordered, 50),
            "p95_ms": percentile(ordered, 95),
            "p99_ms": percentile(ordered, 99),
        }


#: Counts of a node no record named.
_NONE = (0, 0)


def _rate(total: int, errors: int) -> float:
    return 100.0 if total == 0 else (total - errors) / total * 100.0


class EdgeMetrics:
    """Collects invocation records.

    The seed's queries with the seed's parameters: ``total_invocations(function_id,
    node_id)``, ``success_rate(function_id)``, ``avg_latency_ms(function_id)``,
    ``error_count(node_id)``; ours add ``error_count(function_id=)`` and percentiles.
    """

    def __init__(self, *, window: int = DEFAULT_WINDOW, history: int = DEFAULT_HISTORY) -> None:
        self._window = window
        self._lock = threading.Lock()
        self._stats: dict[str, _FunctionStats] = {}
        self._total = _FunctionStats(latencies=deque(maxlen=window))
        self.records: deque[InvocationRecord] = deque(maxlen=history)

    def record(self, record: InvocationRecord) -> None:
        # Read the record once, outside the lock: this runs once per invocation.
        node_id, ms = record.node_id, record.duration_ms
        ok, cold, error_type = record.success, record.cold_start, record.error_type
        with self._lock:
            self.records.append(record)
            stats = self._stats.get(record.function_id)
            if stats is None:
                stats = self._stats[record.function_id] = _FunctionStats(
                    latencies=deque(maxlen=self._window)
                )
            total = self._total
            stats.invocations += 1
            total.invocations += 1
            stats.total_ms += ms
            total.total_ms += ms
            stats.latencies.append(ms)
            total.latencies.append(ms)
            counts = stats.by_node.get(node_id)
            if counts is None:
                counts = stats.by_node[node_id] = [0, 0]
            counts[0] += 1
            total_counts = total.by_node.get(node_id)
            if total_counts is None:
                total_counts = total.by_node[node_id] = [0, 0]
            total_counts[0] += 1
            # The rare counters only when there is something to count.
            if cold:
                stats.cold_starts += cold
                total.cold_starts += cold
            if not ok:
                stats.errors += 1
                total.errors += 1
                counts[1] += 1
                total_counts[1] += 1
            if error_type == "timeout":
                stats.timeouts += 1
                total.timeouts += 1

    def _get(self, function_id: str | None) -> _FunctionStats:
        if function_id is None:
            return self._total
        return self._stats.get(function_id) or _FunctionStats()

    def total_invocations(self, function_id: str | None = None, node_id: str | None = None) -> int:
        """Invocations recorded, of one function and/or on one node when given."""
        with self._lock:
            stats = self._get(function_id)
            if node_id is None:
                return stats.invocations
            return stats.by_node.get(node_id, _NONE)[0]

    def success_rate(self, function_id: str | None = None) -> float:
        """Percent of successful invocations; 100.0 when there were none."""
        with self._lock:
            stats = self._get(function_id)
            return _rate(stats.invocations, stats.errors)

    def avg_latency_ms(self, function_id: str | None = None) -> float:
        """Mean duration in ms; 0.0 when there were none."""
        with self._lock:
            stats = self._get(function_id)
            return stats.total_ms / stats.invocations if stats.invocations else 0.0

    def error_count(self, node_id: str | None = None, *, function_id: str | None = None) -> int:
        """Failed invocations, on one node and/or of one function when given.

        The seed's first parameter is ``node_id``: ``error_count("gw-01")`` counts a node.
        """
        with self._lock:
            stats = self._get(function_id)
            if node_id is None:
                return stats.errors
            return stats.by_node.get(node_id, _NONE)[1]

    def percentiles(self, function_id: str | None = None) -> dict[str, float]:
        """p50/p95/p99 in ms over the last ``window`` invocations."""
        with self._lock:
            snap = self._get(function_id).snapshot()
        return {k: snap[k] for k in ("p50_ms", "p95_ms", "p99_ms")}

    def function_stats(self, function_id: str) -> dict[str, Any]:
        with self._lock:
            return self._get(function_id).snapshot()

    def forget(self, function_id: str) -> None:
        with self._lock:
            self._stats.pop(function_id, None)

    def summary(self) -> dict[str, Any]:
        """The seed's keys first (``total``, ``success_rate``, ``avg_latency`` in ms,
        ``error_count``), then percentiles and per-function stats."""
        with self._lock:
            total = self._total.snapshot()
            return {
                "total": total["invocations"],
                "success_rate": total["success_rate"],
                "avg_latency": total["avg_latency_ms"],
                "error_count": total["errors"],
                "p50_ms": total["p50_ms"],
                "p95_ms": total["p95_ms"],
                "p99_ms": total["p99_ms"],
                "functions": {fid: s.snapshot() for fid, s in self._stats.items()},
            }


_MIB = 1024 * 1024


def system_metrics(disk_path: str = "/") -> dict[str, Any]:
    """psutil's view of the node for heartbeats (the contract's ``system`` object)."""
    import os

    import psutil

    memory = psutil.virtual_memory()
    try:
        disk_free = psutil.disk_usage(disk_path).free
    except OSError:
        disk_free = 0
    result: dict[str, Any] = {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory_used_mb": round((memory.total - memory.available) / _MIB, 1),
        "memory_total_mb": round(memory.total / _MIB, 1),
        "disk_free_mb": round(disk_free / _MIB, 1),
        "load_1m": os.getloadavg()[0],
    }
    temperature = _temperature_c(psutil)
    if temperature is not None:
        result["temperature_c"] = temperature
    return result


def _temperature_c(psutil: Any) -> float | None:
    """The hottest sensor reading, when the board has sensors."""
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return None
    readings = [t.current for entries in sensors.values() for t in entries if t.current]
    return round(max(readings), 1) if readings else None
