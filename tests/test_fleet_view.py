"""The fleet controller's pure parts: the view's status rules on a fake clock, rollout results,
canary choice, and specs built from code on disk. No broker: these are state machines."""

from __future__ import annotations

import base64
import io
import zipfile
from pathlib import Path
from typing import Any

import pytest

from agent.cloud import FleetView, canary_count, function_spec, spec_from_function
from agent.cloud import rollout as ro
from agent.contract import protocol
from agent.errors import DeploymentRejected
from agent.models import EdgeFunction, EdgeNodeStatus

P = "edge"


def status(node: str, state: str = "online", caps: list[str] | None = None, **extra: Any) -> bytes:
    return protocol.encode_status(
        node,
        state,
        agent_version="0.1.0",
        name=f"name of {node}",
        location="lab",
        capabilities=caps or ["python"],
        extra=extra or None,
    )


def heartbeat(node: str, functions: list[dict[str, Any]] | None = None, **extra: Any) -> bytes:
    system = {
        "cpu_percent": 5.0,
        "memory_used_mb": 100.0,
        "memory_total_mb": 1000.0,
        "disk_free_mb": 1.0,
        "load_1m": 0.1,
    }
    return protocol.encode_heartbeat(node, 1, 1.0, "online", system, functions or [], extra)


def fn_entry(fid: str, state: str) -> dict[str, Any]:
    return {
        "id": fid,
        "version": "1",
        "state": state,
        "invocations": 0,
        "errors": 0,
        "timeouts": 0,
        "p50_ms": None,
        "p95_ms": None,
    }


def view_with(*nodes: str, interval: float = 1.0) -> FleetView:
    view = FleetView(P, heartbeat_interval_s=interval)
    for node in nodes:
        view.ingest(f"{P}/nodes/{node}/status", status(node), now=0.0)
    return view


def status_at(view: FleetView, node: str, now: float) -> EdgeNodeStatus:
    return view.status_of(view.records[node], now)


def test_status_message_discovers_a_node_with_its_identity() -> None:
    """A retained status is enough to know a node: name, location, capabilities, version."""
    view = FleetView(P)
    kind = view.ingest(
        f"{P}/nodes/gw-1/status", status("gw-1", caps=["gpio"]), now=0.0, retained=True
    )
    assert kind == "status"
    (node,) = view.nodes(0.0)
    assert (node.id, node.name, node.location, node.capabilities) == (
        "gw-1",
        "name of gw-1",
        "lab",
        ["gpio"],
    )
    assert node.status is EdgeNodeStatus.ONLINE
    assert node.metadata["agent_version"] == "0.1.0"


def test_three_missed_heartbeat_intervals_make_a_node_offline() -> None:
    """Silence for more than 3 intervals is OFFLINE, with a reason; a heartbeat revives it."""
    view = view_with("gw-1", interval=1.0)
    assert status_at(view, "gw-1", 2.9) is EdgeNodeStatus.ONLINE
    assert status_at(view, "gw-1", 3.1) is EdgeNodeStatus.OFFLINE
    node = view.refresh(view.records["gw-1"], 3.1)
    assert "no heartbeat for 3.1s" in node.metadata["offline_reason"]

    view.ingest(f"{P}/nodes/gw-1/heartbeat", heartbeat("gw-1"), now=3.2)
    assert status_at(view, "gw-1", 3.2) is EdgeNodeStatus.ONLINE
    assert "offline_reason" not in view.refresh(view.records["gw-1"], 3.2).metadata


def test_heartbeat_interval_field_overrides_the_configured_interval() -> None:
    """A heartbeat's interval_s (extra field) sets that node's staleness clock."""
    view = view_with("gw-1", interval=30.0)
    view.ingest(f"{P}/nodes/gw-1/heartbeat", heartbeat("gw-1", interval_s=0.5), now=0.0)
    assert status_at(view, "gw-1", 1.4) is EdgeNodeStatus.ONLINE
    assert status_at(view, "gw-1", 1.6) is EdgeNodeStatus.OFFLINE


def test_last_will_is_offline_and_a_late_heartbeat_does_not_revive_it() -> None:
    """The Will's offline status wins over a heartbeat that was in flight when it fired."""
    view = view_with("gw-1")
    will = status("gw-1", "offline", reason="connection lost")
    view.ingest(f"{P}/nodes/gw-1/status", will, now=0.5)
    view.ingest(f"{P}/nodes/gw-1/heartbeat", heartbeat("gw-1"), now=0.6)
    node = view.refresh(view.records["gw-1"], 0.7)
    assert node.status is EdgeNodeStatus.OFFLINE
    assert node.metadata["offline_reason"] == "connection lost"
    view.ingest(f"{P}/nodes/gw-1/status", status("gw-1"), now=1.0)
    assert status_at(view, "gw-1", 1.0) is EdgeNodeStatus.ONLINE


def test_degraded_rules() -> None:
    """DEGRADED: said by the status, or a failed function, or a deep outbox; not a rejection."""
    view = view_with("said", "failed", "rejected", "outbox")
    view.ingest(f"{P}/nodes/said/status", status("said", "degraded"), now=0.0)
    view.ingest(
        f"{P}/nodes/failed/heartbeat", heartbeat("failed", [fn_entry("f", "failed")]), now=0.0
    )
    view.ingest(
        f"{P}/nodes/rejected/heartbeat",
        heartbeat("rejected", [fn_entry("f", "rejected")]),
        now=0.0,
    )
    view.ingest(
        f"{P}/nodes/outbox/heartbeat",
        heartbeat("outbox", outbox={"messages": 5000, "bytes": 1}),
        now=0.0,
    )
    got = {n.id: n.status for n in view.nodes(0.1)}
    assert got == {
        "failed": EdgeNodeStatus.DEGRADED,
        "outbox": EdgeNodeStatus.DEGRADED,
        "rejected": EdgeNodeStatus.ONLINE,
        "said": EdgeNodeStatus.DEGRADED,
    }
    assert [n.id for n in view.nodes(0.1, EdgeNodeStatus.ONLINE)] == ["rejected"]


def test_bad_messages_are_counted_not_fatal() -> None:
    """Garbage, a node id that does not match its topic: counted as bad, the view goes on."""
    view = view_with("gw-1")
    assert view.ingest(f"{P}/nodes/gw-1/heartbeat", b"{not json", now=0.0) == "bad"
    assert view.ingest(f"{P}/nodes/gw-2/status", status("gw-1"), now=0.0) == "bad"
    assert "does not match" in (view.last_error or "")
    assert view.counts["bad"] == 2
    assert [n.id for n in view.nodes(0.0)] == ["gw-1"]


def test_cleared_status_forgets_the_node() -> None:
    """An empty retained status (a decommissioned node) removes it from the view."""
    view = view_with("gw-1", "gw-2")
    view.ingest(f"{P}/nodes/gw-1/status", b"", now=0.0)
    assert [n.id for n in view.nodes(0.0)] == ["gw-2"]


# -- rollout results --------------------------------------------------------------------------


def make_spec(tmp_path: Path, source: str = "def handler(e):\n    return e\n", **kw: Any) -> Any:
    path = tmp_path / "mod.py"
    path.write_text(source)
    return function_spec(path, id="fn", **kw)


def state_msg(spec: Any, state: str, version: str | None = None) -> bytes:
    error = None if state == "active" else {"type": "handler_error", "message": "boom"}
    return protocol.encode_function_state(
        spec.id, version or spec.version, spec.code.sha256, state, error
    )


def test_node_result_matches_version_and_sha(tmp_path: Path) -> None:
    """Only a state for this very spec counts; another version's is still pending."""
    spec = make_spec(tmp_path)
    view = view_with("a", "b", "c", "d")
    view.ingest(f"{P}/nodes/a/functions/fn/state", state_msg(spec, "active"), now=0.0)
    view.ingest(f"{P}/nodes/b/functions/fn/state", state_msg(spec, "failed"), now=0.0)
    view.ingest(f"{P}/nodes/c/functions/fn/state", state_msg(spec, "active", "old"), now=0.0)
    view.ingest(f"{P}/nodes/d/status", status("d", "offline"), now=0.0)
    report = ro.report(view, spec, ["a", "b", "c", "d", "ghost"], 0.1)
    assert {n: r.state for n, r in report.results.items()} == {
        "a": "active",
        "b": "failed",
        "c": "pending",
        "d": "offline",
        "ghost": "offline",
    }
    assert report.results["b"].error == {"type": "handler_error", "message": "boom"}
    assert report.counts() == {"active": 1, "rejected": 0, "failed": 1, "offline": 2, "pending": 1}
    assert not report.done and not report.ok


def test_targets_skip_offline_nodes_and_unmet_requires(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, requires=["gpio"])
    view = FleetView(P)
    view.ingest(f"{P}/nodes/a/status", status("a", caps=["gpio", "camera"]), now=0.0)
    view.ingest(f"{P}/nodes/b/status", status("b", caps=["camera"]), now=0.0)
    view.ingest(f"{P}/nodes/c/status", status("c", "offline", caps=["gpio"]), now=0.0)
    assert ro.targets(view, spec, 0.0) == ["a"]


@pytest.mark.parametrize(
    ("canary", "eligible", "expected"),
    [("10%", 100, 10), ("10%", 5, 1), (0.25, 10, 3), (3, 2, 2), ("2", 10, 2), ("100%", 7, 7)],
)
def test_canary_count(canary: Any, eligible: int, expected: int) -> None:
    assert canary_count(canary, eligible) == expected


@pytest.mark.parametrize("canary", [0, "0%", "150%", 1.5, True, "x"])
def test_canary_count_refuses_nonsense(canary: Any) -> None:
    with pytest.raises(ValueError):
        canary_count(canary, 10)


def test_canaries_are_healthy_and_stable(tmp_path: Path) -> None:
    """Canaries: ONLINE (not degraded) nodes, the same ones for the same function each time."""
    spec = make_spec(tmp_path)
    view = view_with(*[f"n{i}" for i in range(20)])
    view.ingest(f"{P}/nodes/n3/status", status("n3", "degraded"), now=0.0)
    first = ro.pick_canaries(view, spec, 0.0, 5)
    assert len(first) == 5 and "n3" not in first
    assert ro.pick_canaries(view, spec, 0.0, 5) == first


# -- specs from code on disk ------------------------------------------------------------------


def test_spec_from_a_module_file(tmp_path: Path) -> None:
    """A .py file: source format, entrypoint <stem>:handler, version from the sha256."""
    spec = make_spec(tmp_path, memory_mb=64, environment={"UNITS": "c"}, requires=["gpio"])
    assert spec.code.format == "source"
    assert spec.entrypoint == "mod:handler"
    assert spec.version == spec.code.sha256[:12]
    assert protocol.decode_spec(protocol.encode_spec(spec)) == spec


def test_spec_from_a_directory_is_deterministic(tmp_path: Path) -> None:
    """A directory is zipped deterministically: the same tree, the same sha256 and version."""
    pkg = tmp_path / "code" / "sensor"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("def handle(e):\n    return e\n")
    one = function_spec(tmp_path / "code", id="s", entrypoint="sensor:handle")
    two = function_spec(tmp_path / "code", id="s", entrypoint="sensor:handle")
    assert one.code.format == "zip" and one.code.sha256 == two.code.sha256
    names = zipfile.ZipFile(io.BytesIO(base64.b64decode(one.code.data))).namelist()
    assert names == ["sensor/__init__.py"]


def test_spec_refuses_a_bundle_without_the_entrypoint_module(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "other.py").write_text("x = 1\n")
    with pytest.raises(DeploymentRejected, match=r"neither sensor\.py nor sensor/__init__\.py"):
        function_spec(tmp_path / "code", id="s", entrypoint="sensor:handle")


def test_spec_refuses_bad_fields_with_the_agents_rules(tmp_path: Path) -> None:
    with pytest.raises(DeploymentRejected, match="memory_mb"):
        make_spec(tmp_path, memory_mb=0)
    with pytest.raises(DeploymentRejected, match=r"expected a \.py file"):
        function_spec(tmp_path / "notes.txt", id="x")


def test_callable_handlers_cannot_be_deployed_remotely() -> None:
    """A lambda has no code on disk to send: the error says what to use instead."""
    with pytest.raises(DeploymentRejected, match="from_package"):
        spec_from_function(EdgeFunction(id="f", name="f", handler=lambda e: e))


def test_packaged_edge_function_becomes_a_spec(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "thermo.py").write_text("def handle(e):\n    return e\n")
    fn = EdgeFunction.from_package(
        "thermo", "Thermo", str(tmp_path / "pkg"), "thermo:handle", memory_mb=32, version="7"
    )
    spec = spec_from_function(fn)
    assert (spec.id, spec.name, spec.version, spec.memory_mb) == ("thermo", "Thermo", "7", 32)
    assert spec.code.format == "zip"
