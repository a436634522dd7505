"""EdgeMetrics: the seed's queries, exact counters, nearest-rank percentiles, bounded memory."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from agent import EdgeMetrics, InvocationRecord
from agent.exec.metrics import (
    DEFAULT_HISTORY,
    DEFAULT_WINDOW,
    percentile,
    success_record,
    system_metrics,
)


def record(
    function_id: str = "f",
    duration_ms: float = 1.0,
    *,
    success: bool = True,
    error_type: str | None = None,
    cold_start: bool = False,
    node_id: str = "gw",
) -> InvocationRecord:
    return InvocationRecord(
        function_id=function_id,
        node_id=node_id,
        duration_ms=duration_ms,
        success=success,
        error="" if success else "boom",
        error_type=error_type,
        cold_start=cold_start,
    )


def test_invocation_record_start_time_defaults_from_timestamp() -> None:
    """Without start_time, it is the record's timestamp minus its duration (epoch seconds)."""
    rec = InvocationRecord("f", "gw", 250.0, True)
    assert rec.start_time == rec.timestamp.timestamp() - 0.25
    given = InvocationRecord("f", "gw", 3.0, True, start_time=12.5)
    assert given.start_time == 12.5


def test_invocation_record_error_none_is_stored_as_empty() -> None:
    """error=None (what the agent's callers passed for a success) is stored as the seed's ""."""
    rec = InvocationRecord(
        function_id="f", node_id="gw", start_time=1.0, duration_ms=1.0, success=True, error=None
    )
    assert rec.error == ""
    assert InvocationRecord("f", "gw", 1.0, False, error="boom").error == "boom"


def test_empty_metrics() -> None:
    """With no invocations: 100 % success, 0.0 ms latency, zero counts and percentiles."""
    metrics = EdgeMetrics()
    assert metrics.success_rate() == 100.0
    assert metrics.avg_latency_ms() == 0.0
    assert metrics.total_invocations() == 0
    assert metrics.error_count() == 0
    assert metrics.percentiles() == {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0}
    assert metrics.success_rate("unknown") == 100.0
    assert metrics.avg_latency_ms("unknown") == 0.0
    assert list(metrics.records) == []
    summary = metrics.summary()
    assert list(summary)[:4] == ["total", "success_rate", "avg_latency", "error_count"]
    assert (summary["total"], summary["success_rate"]) == (0, 100.0)
    assert (summary["avg_latency"], summary["error_count"]) == (0.0, 0)
    assert summary["functions"] == {}


def test_counters_per_function_and_total() -> None:
    """Success rate, mean latency, errors, time-outs and cold starts, per function and overall."""
    metrics = EdgeMetrics()
    metrics.record(record("a", 10.0, cold_start=True))
    metrics.record(record("a", 20.0))
    metrics.record(record("a", 30.0, success=False, error_type="handler_error"))
    metrics.record(record("b", 40.0, success=False, error_type="timeout"))

    assert metrics.total_invocations() == 4
    assert metrics.total_invocations("a") == 3
    assert metrics.success_rate() == 50.0
    assert metrics.success_rate("a") == pytest.approx(200 / 3)
    assert metrics.success_rate("b") == 0.0
    assert metrics.avg_latency_ms() == 25.0
    assert metrics.avg_latency_ms("a") == 20.0
    assert metrics.error_count() == 2 and metrics.error_count(function_id="b") == 1
    a = metrics.function_stats("a")
    assert (a["invocations"], a["errors"], a["timeouts"], a["cold_starts"]) == (3, 1, 0, 1)
    assert metrics.function_stats("b")["timeouts"] == 1
    summary = metrics.summary()
    assert (summary["total"], summary["success_rate"]) == (4, 50.0)
    assert (summary["avg_latency"], summary["error_count"]) == (25.0, 2)
    assert set(summary["functions"]) == {"a", "b"}


def test_counts_per_node() -> None:
    """The seed's node_id filters: total_invocations(fid, node_id) and error_count(node_id)."""
    metrics = EdgeMetrics()
    metrics.record(record("a", node_id="gw-1"))
    metrics.record(record("a", node_id="gw-2", success=False))
    metrics.record(record("b", node_id="gw-2", success=False))
    metrics.record(record("b", node_id="gw-2"))

    assert metrics.total_invocations(node_id="gw-2") == 3
    assert metrics.total_invocations("a", "gw-2") == 1
    assert metrics.total_invocations("b", node_id="gw-1") == 0
    assert metrics.total_invocations(node_id="gw-9") == 0
    assert metrics.error_count("gw-2") == 2, "error_count's first parameter is node_id"
    assert metrics.error_count("gw-1") == 0 and metrics.error_count("a") == 0
    assert metrics.error_count("gw-2", function_id="b") == 1
    assert metrics.error_count(function_id="a") == 1
    metrics.forget("a")
    assert metrics.total_invocations(node_id="gw-2") == 3, "forget keeps the node totals"
    assert metrics.total_invocations("a", "gw-2") == 0


def test_percentiles_are_nearest_rank() -> None:
    """p50/p95/p99 over 1..100 ms are 50, 95 and 99 (nearest rank), whatever the order."""
    metrics = EdgeMetrics()
    for ms in reversed(range(1, 101)):
        metrics.record(record("f", float(ms)))

    assert metrics.percentiles() == {"p50_ms": 50.0, "p95_ms": 95.0, "p99_ms": 99.0}
    assert metrics.percentiles("f") == metrics.percentiles()
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 50) == 1.0
    assert percentile([1.0, 2.0], 100) == 2.0


def test_memory_is_bounded_under_50000_records() -> None:
    """50,000 records keep a bounded log and latency window; the counters stay exact."""
    metrics = EdgeMetrics()
    n = 50_000
    for i in range(n):
        metrics.record(record("f", float(i)))

    assert len(metrics.records) == DEFAULT_HISTORY
    assert metrics.records[-1].duration_ms == n - 1
    assert metrics.records[0].duration_ms == n - DEFAULT_HISTORY
    assert metrics.total_invocations() == n
    assert metrics.avg_latency_ms() == pytest.approx((n - 1) / 2)
    # Percentiles come from the last DEFAULT_WINDOW latencies only: the window is bounded.
    oldest_kept = n - DEFAULT_WINDOW
    expected_p50 = float(oldest_kept + DEFAULT_WINDOW // 2 - 1)
    assert metrics.percentiles()["p50_ms"] == expected_p50
    assert metrics.percentiles("f")["p50_ms"] == expected_p50


def test_window_and_history_are_configurable() -> None:
    """EdgeMetrics(window=, history=) bound percentiles and the record log."""
    metrics = EdgeMetrics(window=10, history=5)
    for i in range(100):
        metrics.record(record("f", float(i)))
    assert len(metrics.records) == 5
    assert metrics.percentiles()["p50_ms"] == 94.0  # last 10 are 90..99; rank 5 -> 94
    assert metrics.percentiles("f")["p99_ms"] == 99.0


def test_forget_drops_one_function() -> None:
    """forget() drops a function's stats (an undeployed function) but not the totals."""
    metrics = EdgeMetrics()
    metrics.record(record("a"))
    metrics.record(record("b"))
    metrics.forget("a")
    assert metrics.total_invocations("a") == 0
    assert metrics.total_invocations("b") == 1
    assert metrics.total_invocations() == 2
    metrics.forget("never-seen")


def test_record_is_thread_safe() -> None:
    """Eight threads recording at once lose no count."""
    metrics = EdgeMetrics()

    def work(fid: str) -> None:
        for _ in range(2000):
            metrics.record(record(fid, 1.0))

    threads = [threading.Thread(target=work, args=(f"f{i % 2}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert metrics.total_invocations() == 16_000
    assert metrics.total_invocations("f0") == metrics.total_invocations("f1") == 8000


def test_system_metrics_has_the_heartbeat_fields() -> None:
    """system_metrics() gives the heartbeat's ``system`` object with numeric fields."""
    system = system_metrics()
    for key in ("cpu_percent", "memory_used_mb", "memory_total_mb", "disk_free_mb", "load_1m"):
        assert isinstance(system[key], int | float), key
    assert 0 < system["memory_used_mb"] <= system["memory_total_mb"]
    assert system["disk_free_mb"] > 0
    assert system_metrics("/no/such/path")["disk_free_mb"] == 0


def test_success_record_equals_the_keyword_record() -> None:
    """metrics.success_record (the runtime's per-invocation path) makes what the dataclass
    makes from the same values as keywords, field for field."""
    fast = success_record("f", "gw", 12.5, 3.0, "r-1", True, 2048)
    slow = InvocationRecord(
        function_id="f",
        node_id="gw",
        start_time=12.5,
        duration_ms=3.0,
        success=True,
        request_id="r-1",
        cold_start=True,
        peak_rss_kb=2048,
    )
    assert type(fast) is InvocationRecord
    fields = [f.name for f in dataclasses.fields(InvocationRecord) if f.name != "timestamp"]
    assert [getattr(fast, name) for name in fields] == [getattr(slow, name) for name in fields]
    assert abs((fast.timestamp - slow.timestamp).total_seconds()) < 60


def test_success_and_failure_counters_per_node_and_timeouts() -> None:
    """The counters record() keeps for every outcome: errors per node, cold starts, and
    timeouts (counted by error_type, as before)."""
    metrics = EdgeMetrics()
    metrics.record(record("f", node_id="a", cold_start=True))
    metrics.record(record("f", node_id="a", success=False, error_type="timeout"))
    metrics.record(record("f", node_id="b", success=False, error_type="handler_error"))
    metrics.record(record("g", node_id="b"))
    stats = metrics.function_stats("f")
    assert (stats["invocations"], stats["errors"], stats["timeouts"], stats["cold_starts"]) == (
        3,
        2,
        1,
        1,
    )
    assert metrics.total_invocations(node_id="a") == 2 and metrics.error_count("a") == 1
    assert metrics.total_invocations("f", node_id="b") == 1 and metrics.error_count("b") == 1
    assert metrics.error_count(function_id="g") == 0 and metrics.total_invocations() == 4
    summary = metrics.summary()
    assert (summary["total"], summary["error_count"]) == (4, 2)
