"""The seed's Python API, kept name for name: ``from agent import ...`` works as the seed's
README promised, with the limits made real. The Quick Start runs as a ``__main__`` script
in a fresh interpreter, exactly as a user would run it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from procutil import RuntimeFactory, leak_check, pid_is_gone, processes_with_cwd, run_script

import agent
from agent import (
    EdgeCluster,
    EdgeExecutionError,
    EdgeFunction,
    EdgeMetrics,
    EdgeNode,
    EdgeNodeStatus,
    EdgeRuntime,
    EdgeSynchronizer,
    FunctionNotFound,
    HandlerError,
    InvocationRecord,
    SyncState,
)
from testing.wait import wait_for

QUICK_START = """\
from agent import EdgeNode, EdgeFunction, EdgeRuntime

def process_sensor(data):
    return {"processed": True, "value": data["temperature"] * 1.8 + 32}

node = EdgeNode(id="gateway-01", name="Factory Gateway", location="building-a")
runtime = EdgeRuntime(node)
runtime.deploy(EdgeFunction(id="sensor-processor", name="Sensor Processor", handler=process_sensor, memory_mb=64, timeout_seconds=5))
result = runtime.invoke("sensor-processor", {"temperature": 25})
print(result)
"""  # noqa: E501  (the README's text, verbatim)


class SensorFault(Exception):
    """A user's own exception class, importable from this module (so picklable)."""


class UnpicklableFault(Exception):
    """An exception whose constructor pickle cannot call again (two required arguments)."""

    def __init__(self, sensor: str, reading: float) -> None:
        super().__init__(f"{sensor} read {reading}")


@pytest.fixture
def make_runtime() -> Iterator[RuntimeFactory]:
    with RuntimeFactory() as factory:
        yield factory


@pytest.fixture
def runtime(make_runtime: RuntimeFactory) -> EdgeRuntime:
    return make_runtime("gateway-01")


@pytest.fixture
def cluster() -> Iterator[EdgeCluster]:
    with leak_check(), EdgeCluster() as c:
        yield c


def _make_failing() -> Callable[[str], Any]:
    def fail(kind: str) -> Any:
        if kind == "value":
            raise ValueError("bad reading -273.16")
        if kind == "key":
            return {}["temperature"]
        if kind == "zero":
            return 1 / 0
        if kind == "exit":
            sys.exit("handler asked to exit")
        return "fine"

    return fail


def _make_custom_failing() -> Callable[[str], Any]:
    """Raises this module's exception classes, so the worker imports this module to run it."""

    def fail(kind: str) -> Any:
        if kind == "custom":
            raise SensorFault("sensor 7 unplugged")
        raise UnpicklableFault("sensor 7", -1.0)

    return fail


# -- names and data model ----------------------------------------------------------------------


def test_seed_names_are_exported_from_agent() -> None:
    """Every name of the seed's API is importable from ``agent`` and listed in ``__all__``."""
    names = [
        "EdgeNode",
        "EdgeNodeStatus",
        "EdgeFunction",
        "EdgeRuntime",
        "EdgeCluster",
        "EdgeSynchronizer",
        "SyncState",
        "EdgeExecutionError",
        "EdgeMetrics",
        "InvocationRecord",
    ]
    for name in names:
        assert getattr(agent, name) is not None
        assert name in agent.__all__
    with pytest.raises(AttributeError):
        agent.NoSuchThing  # noqa: B018


def test_edge_node_status_values() -> None:
    """The statuses and their wire values are the seed's."""
    assert {s.name: s.value for s in EdgeNodeStatus} == {
        "ONLINE": "online",
        "OFFLINE": "offline",
        "DEGRADED": "degraded",
        "SYNCING": "syncing",
    }
    assert EdgeNodeStatus("degraded") is EdgeNodeStatus.DEGRADED


def test_edge_node_defaults() -> None:
    """EdgeNode needs only id and name; the rest defaults as in the seed."""
    before = datetime.now()
    node = EdgeNode(id="gw", name="Gateway")
    other = EdgeNode(id="gw2", name="Other")

    assert node.location == ""
    assert node.status is EdgeNodeStatus.ONLINE
    assert node.capabilities == []
    assert node.metadata == {}
    assert isinstance(node.last_heartbeat, datetime)
    assert before <= node.last_heartbeat <= datetime.now()
    node.capabilities.append("gpu")
    node.metadata["rack"] = 3
    assert other.capabilities == [] and other.metadata == {}, "mutable defaults are shared"


def test_edge_function_defaults() -> None:
    """EdgeFunction defaults: 128 MB, 30 s, empty environment, one at a time."""
    fn = EdgeFunction(id="f", name="F", handler=len)
    other = EdgeFunction(id="g", name="G", handler=len)

    assert fn.memory_mb == 128
    assert fn.timeout_seconds == 30
    assert fn.environment == {}
    assert fn.concurrency == 1
    fn.environment["A"] = "1"
    assert other.environment == {}, "mutable defaults are shared"


# -- the seed's dataclasses field by field, its signatures ---------------------------------------


class _Required:
    """A seed field with no default."""


class _Fresh:
    """A seed field whose default_factory gives a new empty ``kind`` each time."""

    def __init__(self, kind: type) -> None:
        self.kind = kind


class _Now:
    """A seed field whose default_factory gives a naive ``datetime.now()``."""


REQUIRED, NOW = _Required(), _Now()

#: The seed's fields in the seed's order with the seed's defaults (DESIGN.md, "Python API").
SEED_FIELDS: dict[type, list[tuple[str, Any]]] = {
    EdgeNode: [
        ("id", REQUIRED),
        ("name", REQUIRED),
        ("location", ""),
        ("status", EdgeNodeStatus.ONLINE),
        ("capabilities", _Fresh(list)),
        ("metadata", _Fresh(dict)),
        ("last_heartbeat", NOW),
    ],
    EdgeFunction: [
        ("id", REQUIRED),
        ("name", REQUIRED),
        ("handler", REQUIRED),
        ("memory_mb", 128),
        ("timeout_seconds", 30),
        ("environment", _Fresh(dict)),
    ],
    SyncState: [
        ("version", REQUIRED),
        ("data", REQUIRED),
        ("checksum", REQUIRED),
        ("updated_at", NOW),
    ],
    InvocationRecord: [
        ("function_id", REQUIRED),
        ("node_id", REQUIRED),
        ("duration_ms", REQUIRED),
        ("success", REQUIRED),
        ("timestamp", NOW),
        ("error", ""),
    ],
}

#: Values for the seed's required fields, passed positionally as a seed user would.
SEED_REQUIRED_ARGS: dict[type, tuple[Any, ...]] = {
    EdgeNode: ("gw", "Gateway"),
    EdgeFunction: ("f", "F", len),
    SyncState: (1, {"a": 1}, "0" * 64),
    InvocationRecord: ("f", "gw", 3.0, True),
}


def _check_default(owner: str, f: dataclasses.Field[Any], expected: Any) -> None:
    if isinstance(expected, _Required):
        assert f.default is dataclasses.MISSING, f"{owner} must be required"
        assert f.default_factory is dataclasses.MISSING, f"{owner} must be required"
        return
    if isinstance(expected, _Fresh | _Now):
        assert f.default_factory is not dataclasses.MISSING, f"{owner}: no default_factory"
        before = datetime.now()
        first, second = f.default_factory(), f.default_factory()
        if isinstance(expected, _Fresh):
            assert type(first) is expected.kind and first == expected.kind(), owner
            assert first is not second, f"{owner}: one default shared by every instance"
        else:
            assert type(first) is datetime, owner
            assert before <= first <= second <= datetime.now(), f"{owner} is not now: {first}"
        return
    assert f.default_factory is dataclasses.MISSING, owner
    assert type(f.default) is type(expected) and f.default == expected, (
        f"{owner}: default {f.default!r}, the seed's is {expected!r}"
    )


@pytest.mark.parametrize("cls", list(SEED_FIELDS), ids=lambda c: c.__name__)
def test_seed_dataclass_fields_names_order_and_defaults(cls: type) -> None:
    """The seed's fields come first, in its order, with its defaults; ours all default."""
    seed = SEED_FIELDS[cls]
    fields = dataclasses.fields(cls)
    assert [f.name for f in fields[: len(seed)]] == [name for name, _ in seed]
    for f, (name, expected) in zip(fields, seed, strict=False):
        _check_default(f"{cls.__name__}.{name}", f, expected)
    for f in fields[len(seed) :]:
        assert f.init, f"{cls.__name__}.{f.name}"
        assert (f.default, f.default_factory) != (dataclasses.MISSING, dataclasses.MISSING), (
            f"{cls.__name__}.{f.name} is an addition, so it needs a default"
        )


@pytest.mark.parametrize("cls", list(SEED_FIELDS), ids=lambda c: c.__name__)
def test_seed_dataclass_built_positionally_keeps_the_defaults(cls: type) -> None:
    """Built from the seed's required fields alone, positionally, an instance holds the
    seed's defaults (nothing in __post_init__ rewrites them)."""
    required = SEED_REQUIRED_ARGS[cls]
    before = datetime.now()
    instance, other = cls(*required), cls(*required)
    after = datetime.now()
    for i, (name, expected) in enumerate(SEED_FIELDS[cls]):
        value = getattr(instance, name)
        if isinstance(expected, _Required):
            assert value is required[i], name
        elif isinstance(expected, _Fresh):
            assert value == expected.kind() and value is not getattr(other, name), name
        elif isinstance(expected, _Now):
            assert type(value) is datetime and before <= value <= after, name
        else:
            assert value == expected and type(value) is type(expected), name


def test_invocation_record_positional_seed_form() -> None:
    """InvocationRecord(fid, node, ms, ok, timestamp, error): the seed's six, positionally."""
    when = datetime(2026, 1, 2, 3, 4, 5)
    rec = InvocationRecord("f", "gw", 2000.0, False, when, "boom")
    assert (rec.timestamp, rec.error) == (when, "boom")
    assert rec.start_time == when.timestamp() - 2.0


def test_sync_state_from_data_is_a_classmethod_with_a_sha256_checksum() -> None:
    """SyncState.from_data(data, version) builds a SyncState; the checksum is SHA-256 of
    the canonical JSON (our deliberate change from the seed's MD5)."""
    assert isinstance(inspect.getattr_static(SyncState, "from_data"), classmethod)
    data = {"b": [1, 2], "a": "é"}
    before = datetime.now()
    state = SyncState.from_data(data, 3)

    assert type(state) is SyncState
    assert (state.version, state.data) == (3, data)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert state.checksum == hashlib.sha256(canonical.encode()).hexdigest()
    assert before <= state.updated_at <= datetime.now()


def _render(p: inspect.Parameter) -> str:
    if p.kind is p.VAR_POSITIONAL:
        return f"*{p.name}"
    if p.kind is p.VAR_KEYWORD:
        return f"**{p.name}"
    text = p.name if p.default is p.empty else f"{p.name}={p.default!r}"
    return f"{text} (keyword-only)" if p.kind is p.KEYWORD_ONLY else text


#: The seed's parameters of each method (self left out), as DESIGN.md lists them.
SEED_SIGNATURES: list[tuple[type, str, list[str]]] = [
    (EdgeRuntime, "__init__", ["node"]),
    (EdgeRuntime, "deploy", ["function"]),
    (EdgeRuntime, "undeploy", ["function_id"]),
    (EdgeRuntime, "invoke", ["function_id", "*args", "**kwargs"]),
    (EdgeRuntime, "list_functions", []),
    (EdgeCluster, "__init__", []),
    (EdgeCluster, "register_node", ["node"]),
    (EdgeCluster, "deregister_node", ["node_id"]),
    (EdgeCluster, "get_node", ["node_id"]),
    (EdgeCluster, "get_runtime", ["node_id"]),
    (EdgeCluster, "list_nodes", ["status=None"]),
    (EdgeCluster, "deploy_to_all", ["function"]),
    (EdgeCluster, "heartbeat", ["node_id"]),
    (EdgeSynchronizer, "__init__", []),
    (EdgeSynchronizer, "get_local_state", []),
    (EdgeSynchronizer, "update_local", ["data"]),
    (EdgeSynchronizer, "apply_remote", ["state"]),
    (EdgeSynchronizer, "get_pending_changes", []),
    (EdgeSynchronizer, "confirm_sync", ["up_to_version"]),
    (EdgeMetrics, "__init__", []),
    (EdgeMetrics, "record", ["record"]),
    (EdgeMetrics, "total_invocations", ["function_id=None", "node_id=None"]),
    (EdgeMetrics, "success_rate", ["function_id=None"]),
    (EdgeMetrics, "avg_latency_ms", ["function_id=None"]),
    (EdgeMetrics, "error_count", ["node_id=None"]),
    (EdgeMetrics, "summary", []),
    (SyncState, "from_data", ["data", "version"]),
]


@pytest.mark.parametrize(
    ("cls", "method", "seed"),
    SEED_SIGNATURES,
    ids=[f"{c.__name__}.{m}" for c, m, _ in SEED_SIGNATURES],
)
def test_seed_method_signatures(cls: type, method: str, seed: list[str]) -> None:
    """Each seed method takes the seed's parameters first, in order, by the seed's names
    and defaults; anything we added after them is optional."""
    params = list(inspect.signature(getattr(cls, method)).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    rendered = [_render(p) for p in params]
    assert rendered[: len(seed)] == seed, f"{cls.__name__}.{method}{tuple(rendered)}"
    for p in params[len(seed) :]:
        assert p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty, (
            f"{cls.__name__}.{method}: {p.name} is an addition, so it needs a default"
        )


# -- the Quick Start ---------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["-X", "dev", "-W", "error"]], ids=["plain", "dev-mode"])
def test_quick_start_script(tmp_path: Path, flags: list[str]) -> None:
    """The README's Quick Start prints the converted reading and leaves no worker behind."""
    with leak_check():
        done = run_script(QUICK_START, tmp_path, flags=flags)

    assert done.returncode == 0, done.stderr
    assert done.stdout == "{'processed': True, 'value': 77.0}\n"
    assert done.stderr == "", "the Quick Start should run silently"
    # Its workers ran in tmp_path (the runtime's cwd); none may outlive the script.
    wait_for(
        lambda: not processes_with_cwd(tmp_path),
        5.0,
        f"workers of the Quick Start outlived it: {processes_with_cwd(tmp_path)}",
    )


# -- EdgeRuntime -------------------------------------------------------------------------------


def test_deploy_invoke_list_undeploy(runtime: EdgeRuntime) -> None:
    """deploy, invoke (args and kwargs), list_functions and undeploy behave as in the seed."""
    f = EdgeFunction(id="add", name="Add", handler=lambda a, b=0: a + b)
    g = EdgeFunction(id="neg", name="Negate", handler=lambda a: -a)
    assert runtime.deploy(f) is None
    runtime.deploy(g)

    assert runtime.invoke("add", 2, b=5) == 7
    assert runtime.invoke("neg", 3) == -3
    assert type(runtime.list_functions()) is list
    assert sorted(fn.id for fn in runtime.list_functions()) == ["add", "neg"]
    assert all(isinstance(fn, EdgeFunction) for fn in runtime.list_functions())

    assert runtime.undeploy("add") is True
    assert runtime.undeploy("add") is False
    assert runtime.undeploy("never-deployed") is False
    assert [fn.id for fn in runtime.list_functions()] == ["neg"]


def test_deploy_same_id_replaces(runtime: EdgeRuntime) -> None:
    """Deploying an id again replaces the function: one entry, and the new handler answers."""
    runtime.deploy(EdgeFunction(id="f", name="v1", handler=lambda: 1))
    assert runtime.invoke("f") == 1
    runtime.deploy(EdgeFunction(id="f", name="v2", handler=lambda: 2))

    assert runtime.invoke("f") == 2
    assert [fn.name for fn in runtime.list_functions()] == ["v2"]


def test_unknown_function_is_a_value_error(runtime: EdgeRuntime) -> None:
    """An unknown id raises an error that is also a ValueError saying "Function not found"."""
    with pytest.raises(ValueError, match="Function not found") as info:
        runtime.invoke("nope", 1)
    assert isinstance(info.value, FunctionNotFound)
    assert "nope" in str(info.value)


@pytest.mark.parametrize(
    ("kind", "original"),
    [
        ("value", ValueError("bad reading -273.16")),
        ("key", KeyError("temperature")),
        ("zero", ZeroDivisionError("division by zero")),
        ("custom", SensorFault("sensor 7 unplugged")),
    ],
)
def test_handler_failure_is_chained_to_the_original(
    runtime: EdgeRuntime, kind: str, original: BaseException
) -> None:
    """A handler's exception comes back as EdgeExecutionError with the original as __cause__."""
    handler = _make_custom_failing() if kind == "custom" else _make_failing()
    runtime.deploy(EdgeFunction(id="fail", name="fail", handler=handler))
    with pytest.raises(EdgeExecutionError) as info:
        runtime.invoke("fail", kind)

    error = info.value
    assert isinstance(error, HandlerError)
    assert str(original) in str(error)
    assert type(error.__cause__) is type(original)
    assert str(error.__cause__) == str(original)
    assert "Traceback" in error.remote_traceback  # type: ignore[attr-defined]


def test_unpicklable_custom_exception_still_reports_its_message(runtime: EdgeRuntime) -> None:
    """An exception pickle cannot rebuild still fails as a HandlerError with its message."""
    runtime.deploy(EdgeFunction(id="fail", name="fail", handler=_make_custom_failing()))
    with pytest.raises(HandlerError, match=r"sensor 7 read -1\.0") as info:
        runtime.invoke("fail", "unpicklable")
    assert "UnpicklableFault" in str(info.value)


def test_sys_exit_in_handler_is_a_handler_error_and_worker_survives(runtime: EdgeRuntime) -> None:
    """sys.exit() in a handler fails that invocation only; the warm worker stays."""
    runtime.deploy(EdgeFunction(id="fail", name="fail", handler=_make_failing()))
    pid = runtime.execute("fail", ("ok",)).worker_pid
    with pytest.raises(HandlerError, match="handler asked to exit") as info:
        runtime.invoke("fail", "exit")
    assert isinstance(info.value.__cause__, SystemExit)
    assert runtime.execute("fail", ("ok",)).worker_pid == pid


def test_runtime_records_metrics_for_every_invocation(runtime: EdgeRuntime) -> None:
    """runtime.metrics gets an InvocationRecord per success and per failure."""
    assert isinstance(runtime.metrics, EdgeMetrics)
    runtime.deploy(EdgeFunction(id="fail", name="fail", handler=_make_failing()))

    runtime.invoke("fail", "ok")
    runtime.execute("fail", ("ok",), request_id="req-42")
    with pytest.raises(HandlerError):
        runtime.invoke("fail", "value")

    first, second, failed = runtime.metrics.records
    assert all(isinstance(r, InvocationRecord) for r in (first, second, failed))
    assert first.success and first.cold_start and first.peak_rss_kb > 0
    assert first.function_id == "fail" and first.node_id == "gateway-01"
    assert first.request_id and len(first.request_id) >= 16
    assert first.duration_ms > 0
    assert second.request_id == "req-42" and not second.cold_start
    assert first.error == "" and isinstance(first.timestamp, datetime)
    assert first.start_time is not None
    assert first.start_time <= first.timestamp.timestamp() <= second.timestamp.timestamp()
    assert not failed.success
    assert failed.error_type == "handler_error"
    assert "bad reading" in failed.error
    assert runtime.metrics.total_invocations("fail") == 3
    assert runtime.metrics.total_invocations("fail", "gateway-01") == 3
    assert runtime.metrics.error_count("gateway-01") == 1
    assert runtime.metrics.error_count(function_id="fail") == 1


def test_main_script_exception_class_comes_back_as_cause(tmp_path: Path) -> None:
    """A script's own exception class is the __cause__ of the EdgeExecutionError."""
    script = """\
from agent import EdgeNode, EdgeFunction, EdgeRuntime, EdgeExecutionError

class SensorFault(Exception):
    pass

def check(data):
    raise SensorFault("sensor unplugged")

with EdgeRuntime(EdgeNode(id="gw", name="gw")) as runtime:
    runtime.deploy(EdgeFunction(id="check", name="check", handler=check))
    try:
        runtime.invoke("check", {})
    except EdgeExecutionError as exc:
        print(type(exc.__cause__) is SensorFault, exc.__cause__)
"""
    done = run_script(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "True sensor unplugged\n"


def test_main_script_result_class_round_trips(tmp_path: Path) -> None:
    """A handler may return an instance of a class its script defines (a dataclass, say)."""
    script = """\
from dataclasses import dataclass
from agent import EdgeNode, EdgeFunction, EdgeRuntime

@dataclass
class Reading:
    fahrenheit: float

def convert(celsius):
    return Reading(celsius * 1.8 + 32)

with EdgeRuntime(EdgeNode(id="gw", name="gw")) as runtime:
    runtime.deploy(EdgeFunction(id="convert", name="convert", handler=convert))
    result = runtime.invoke("convert", 25)
    print(result, type(result) is Reading)
"""
    done = run_script(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Reading(fahrenheit=77.0) True\n"


# -- EdgeCluster (local) -----------------------------------------------------------------------


def _nodes() -> list[EdgeNode]:
    return [
        EdgeNode(id="gw-a", name="A", location="hall-1"),
        EdgeNode(id="gw-b", name="B", location="hall-2"),
        EdgeNode(id="gw-c", name="C", status=EdgeNodeStatus.OFFLINE),
    ]


def test_cluster_register_get_list(cluster: EdgeCluster) -> None:
    """Registered nodes are found by id, each with its own runtime; unknown ids give None."""
    nodes = _nodes()
    for node in nodes:
        assert cluster.register_node(node) is None

    assert cluster.get_node("gw-a") is nodes[0]
    runtime = cluster.get_runtime("gw-b")
    assert isinstance(runtime, EdgeRuntime) and runtime.node is nodes[1]
    assert cluster.get_runtime("gw-a") is not runtime
    assert cluster.get_node("missing") is None
    assert cluster.get_runtime("missing") is None
    assert type(cluster.list_nodes()) is list
    assert [n.id for n in cluster.list_nodes()] == ["gw-a", "gw-b", "gw-c"]
    assert [n.id for n in cluster.list_nodes(EdgeNodeStatus.OFFLINE)] == ["gw-c"]
    assert [n.id for n in cluster.list_nodes(EdgeNodeStatus.ONLINE)] == ["gw-a", "gw-b"]
    assert cluster.list_nodes(EdgeNodeStatus.SYNCING) == []


def test_cluster_deploy_to_all_skips_offline_nodes(cluster: EdgeCluster) -> None:
    """deploy_to_all returns how many nodes got the function; offline nodes are skipped."""
    for node in _nodes():
        cluster.register_node(node)
    fn = EdgeFunction(id="double", name="Double", handler=lambda x: 2 * x)

    count = cluster.deploy_to_all(fn)
    assert type(count) is int and count == 2

    for node_id in ("gw-a", "gw-b"):
        runtime = cluster.get_runtime(node_id)
        assert runtime is not None and runtime.invoke("double", 21) == 42
    offline = cluster.get_runtime("gw-c")
    assert offline is not None and offline.list_functions() == []
    with pytest.raises(ValueError, match="Function not found"):
        offline.invoke("double", 1)


def test_cluster_deregister_closes_the_nodes_runtime(cluster: EdgeCluster) -> None:
    """deregister_node returns True once, False after, and stops that node's workers."""
    for node in _nodes():
        cluster.register_node(node)
    cluster.deploy_to_all(EdgeFunction(id="pid", name="pid", handler=lambda: os.getpid()))
    runtime = cluster.get_runtime("gw-a")
    assert runtime is not None
    pid = runtime.invoke("pid")

    assert cluster.deregister_node("gw-a") is True
    assert cluster.deregister_node("gw-a") is False
    assert cluster.get_node("gw-a") is None and cluster.get_runtime("gw-a") is None
    assert pid_is_gone(pid)
    assert runtime.pool.worker_pids() == []


def test_cluster_reregister_replaces_and_closes_old_runtime(cluster: EdgeCluster) -> None:
    """Registering an id again replaces the node and closes its old runtime."""
    cluster.register_node(EdgeNode(id="gw", name="old"))
    old = cluster.get_runtime("gw")
    assert old is not None
    old.deploy(EdgeFunction(id="f", name="f", handler=lambda: 1))
    assert old.invoke("f") == 1

    cluster.register_node(EdgeNode(id="gw", name="new"))

    node = cluster.get_node("gw")
    assert node is not None and node.name == "new"
    assert cluster.get_runtime("gw") is not old
    assert old.pool.worker_pids() == []
    assert len(cluster.list_nodes()) == 1


def test_cluster_heartbeat(cluster: EdgeCluster) -> None:
    """heartbeat marks a node ONLINE with a fresh time; an unknown id is a no-op."""
    stale = datetime.now() - timedelta(hours=1)
    cluster.register_node(
        EdgeNode(id="gw", name="gw", status=EdgeNodeStatus.OFFLINE, last_heartbeat=stale)
    )
    before = datetime.now()

    assert cluster.heartbeat("gw") is None
    assert cluster.heartbeat("unknown") is None

    node = cluster.get_node("gw")
    assert node is not None
    assert node.status is EdgeNodeStatus.ONLINE
    assert node.last_heartbeat >= before
    assert cluster.get_node("unknown") is None
    assert [n.id for n in cluster.list_nodes()] == ["gw"]


def test_cluster_close_stops_every_runtime() -> None:
    """Leaving ``with EdgeCluster()`` stops the workers of every node."""
    with leak_check():
        with EdgeCluster() as cluster:
            for node in _nodes():
                cluster.register_node(node)
            cluster.deploy_to_all(EdgeFunction(id="f", name="f", handler=lambda: "ok"))
            runtimes = [cluster.get_runtime(n.id) for n in cluster.list_nodes()]
            assert [r.invoke("f") for r in runtimes[:2] if r is not None] == ["ok", "ok"]
        assert all(r is not None and r.pool.worker_pids() == [] for r in runtimes)


# -- EdgeSynchronizer and EdgeMetrics: the seed's return shapes ----------------------------------


def test_synchronizer_return_shapes() -> None:
    """get_local_state -> SyncState | None, update_local -> SyncState, apply_remote -> bool,
    get_pending_changes -> list[dict], confirm_sync -> None."""
    sync = EdgeSynchronizer()
    assert sync.get_local_state() is None
    assert sync.get_pending_changes() == []

    state = sync.update_local({"setpoint": 21})
    assert type(state) is SyncState and state.version == 1 and state.data == {"setpoint": 21}
    local = sync.get_local_state()
    assert type(local) is SyncState and local.checksum == state.checksum
    pending = sync.get_pending_changes()
    assert type(pending) is list and len(pending) == 1 and type(pending[0]) is dict
    assert pending[0]["version"] == 1

    assert sync.apply_remote(SyncState.from_data({"setpoint": 19}, 5)) is True
    assert sync.apply_remote(SyncState.from_data({"setpoint": 18}, 2)) is False
    assert sync.confirm_sync(1) is None
    assert sync.get_pending_changes() == []


def test_metrics_seed_queries_and_summary() -> None:
    """EdgeMetrics(): record -> None; the queries' types and empty values; summary() has the
    seed's four keys first, with the seed's names."""
    metrics = EdgeMetrics()
    assert (metrics.total_invocations(), metrics.error_count()) == (0, 0)
    assert type(metrics.success_rate()) is float and metrics.success_rate() == 100.0
    assert type(metrics.avg_latency_ms()) is float and metrics.avg_latency_ms() == 0.0

    assert metrics.record(InvocationRecord("f", "gw-1", 10.0, True)) is None
    metrics.record(InvocationRecord("f", "gw-2", 30.0, False, error="boom"))
    metrics.record(InvocationRecord("g", "gw-2", 20.0, True))

    assert type(metrics.total_invocations()) is int and metrics.total_invocations() == 3
    assert metrics.total_invocations("f") == 2
    assert metrics.total_invocations("f", "gw-2") == metrics.total_invocations(node_id="gw-1") == 1
    assert metrics.success_rate("f") == 50.0
    assert metrics.avg_latency_ms() == 20.0 and metrics.avg_latency_ms("g") == 20.0
    assert metrics.error_count() == 1
    assert metrics.error_count("gw-2") == 1 and metrics.error_count("gw-1") == 0
    summary = metrics.summary()
    assert type(summary) is dict
    assert list(summary)[:4] == ["total", "success_rate", "avg_latency", "error_count"]
    assert summary["total"] == 3 and summary["error_count"] == 1
    assert summary["success_rate"] == pytest.approx(200 / 3)
    assert summary["avg_latency"] == 20.0
