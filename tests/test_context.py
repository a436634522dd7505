"""The handler's ``context`` (agent/exec/context.py, the worker's side of it) and local mode:
``EdgeRuntime`` running ``handler(..., context)`` with state kept by ``EdgeSynchronizer``."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import EdgeFunction, EdgeNode, EdgeRuntime, EdgeSynchronizer
from agent.errors import EdgeExecutionError, FunctionTimeout, HandlerError
from agent.exec.context import InvocationContext, StateView
from agent.exec.pool import ContextInput
from agent.exec.worker import WorkerMain, context_mode
from agent.store import Store

# -- StateView ----------------------------------------------------------------------------------


def test_reads_see_the_start_state_and_this_invocations_writes() -> None:
    view = StateView({"a": 1, "b": {"c": [1]}})
    assert view.get("a") == 1 and view.get("zzz") is None and view.get("zzz", 5) == 5
    view.set("a", 2)
    view.set("new", "x")
    view.delete("b")
    assert view.get("a") == 2 and view.get("new") == "x"
    assert view.get("b") is None and view.get("b", "gone") == "gone"
    assert "b" not in view and "a" in view and "new" in view
    assert view.keys() == ["a", "new"] and list(view) == ["a", "new"]
    assert view.to_dict() == {"a": 2, "new": "x"}
    assert view.writes == {"a": 2, "new": "x", "b": None}


def test_values_are_copies_both_ways() -> None:
    """Mutating what get() returned, or the object passed to set(), changes nothing."""
    start = {"list": [1, 2]}
    view = StateView(start)
    got = view.get("list")
    got.append(3)
    assert view.get("list") == [1, 2] and start == {"list": [1, 2]}
    mine = {"nested": [1]}
    view.set("obj", mine)
    mine["nested"].append(2)
    assert view.get("obj") == {"nested": [1]} and view.writes["obj"] == {"nested": [1]}


def test_set_none_is_delete() -> None:
    view = StateView({"a": 1})
    view.set("a", None)
    assert "a" not in view and view.writes == {"a": None}


@pytest.mark.parametrize("key", ["", 1, None, ("a",)])
def test_keys_must_be_non_empty_strings(key: Any) -> None:
    with pytest.raises(TypeError, match="non-empty strings"):
        StateView({}).set(key, 1)


@pytest.mark.parametrize("value", [math.nan, math.inf, {1, 2}, object(), {"a": b"bytes"}])
def test_values_must_be_json(value: Any) -> None:
    view = StateView({})
    with pytest.raises(TypeError, match="not JSON"):
        view.set("k", value)
    assert view.writes == {}


# -- InvocationContext --------------------------------------------------------------------------


def make(deadline: float, desired: dict[str, Any] | None = None) -> InvocationContext:
    return InvocationContext(
        function_id="f",
        request_id="r1",
        deadline=deadline,
        state={"a": 1},
        state_version=4,
        desired=desired or {},
        desired_version=2,
    )


def test_desired_is_read_only_and_a_copy() -> None:
    """Desired state is cloud-owned: a handler cannot write it, even by keeping a reference."""
    source = {"mode": "eco", "limits": {"max": 3}}
    context = make(time.monotonic() + 5, source)
    with pytest.raises(TypeError):
        context.desired["mode"] = "boost"  # type: ignore[index]
    source["mode"] = "changed later"
    assert context.desired["mode"] == "eco"
    assert (context.desired_version, context.state_version, context.request_id) == (2, 4, "r1")


def test_remaining_ms_counts_down_to_zero() -> None:
    context = make(time.monotonic() + 2)
    first = context.remaining_ms()
    assert 0 < first <= 2000
    assert context.remaining_ms() <= first
    assert make(time.monotonic() - 1).remaining_ms() == 0.0


# -- how handlers take their context ------------------------------------------------------------


def h_keyword(event, context):  # type: ignore[no-untyped-def]
    return event


def h_positional(event, ctx):  # type: ignore[no-untyped-def]
    return event


def h_kwonly(event, *, context):  # type: ignore[no-untyped-def]
    return event


def h_optional(event, ctx=None):  # type: ignore[no-untyped-def]
    return event


def h_one(event):  # type: ignore[no-untyped-def]
    return event


def h_varargs(*args, **kwargs):  # type: ignore[no-untyped-def]
    return args


@pytest.mark.parametrize(
    ("handler", "json_mode", "pickle_mode"),
    [
        (h_keyword, "keyword", "keyword"),
        (h_kwonly, "keyword", "keyword"),
        (h_positional, "positional", ""),  # local mode: f(a, b) means two arguments
        (h_optional, "", ""),
        (h_one, "", ""),
        (h_varargs, "", ""),
        (len, "", ""),
    ],
)
def test_context_mode(handler: Any, json_mode: str, pickle_mode: str) -> None:
    assert context_mode(handler, "json") == json_mode
    assert context_mode(handler, "pickle") == pickle_mode


def test_worker_keeps_the_documents_it_was_sent_last() -> None:
    """The agent sends state and desired only when their version changed; the worker reuses
    what it had for invocations whose header carries neither."""
    worker = WorkerMain(-1, -1)
    first = worker.make_context(
        {"request_id": "r1", "state": {"a": 1}, "state_version": 1, "desired": {"m": 1}}
        | {"desired_version": 1, "deadline": time.monotonic() + 5}
    )
    assert first.state.to_dict() == {"a": 1} and dict(first.desired) == {"m": 1}
    first.state.set("a", 99)  # this invocation's writes never touch the worker's copy
    second = worker.make_context({"request_id": "r2", "state": {"a": 2}, "state_version": 2})
    assert second.state.to_dict() == {"a": 2} and second.state_version == 2
    assert dict(second.desired) == {"m": 1} and second.desired_version == 1
    third = worker.make_context({"request_id": "r3"})
    assert third.state.to_dict() == {"a": 2} and third.request_id == "r3"
    assert third.remaining_ms() > 0


# -- local mode: EdgeRuntime --------------------------------------------------------------------


def counter(context):  # type: ignore[no-untyped-def]
    n = context.state.get("count", 0) + 1
    context.state.set("count", n)
    return n


def counter_then_fail(how, context):  # type: ignore[no-untyped-def]
    context.state.set("count", -1)
    context.state.set("poison", True)
    if how == "raise":
        raise RuntimeError("after writing")
    time.sleep(30)


def see_context(context):  # type: ignore[no-untyped-def]
    return {
        "state": context.state.to_dict(),
        "version": context.state_version,
        "desired": dict(context.desired),
        "remaining_ms": context.remaining_ms(),
    }


NODE = EdgeNode(id="local", name="local")


@pytest.fixture
def runtime() -> Iterator[EdgeRuntime]:
    with EdgeRuntime(NODE, max_workers=2, prestart=0) as rt:
        yield rt


def test_local_counter_keeps_its_state_across_invocations(runtime: EdgeRuntime) -> None:
    runtime.deploy(EdgeFunction(id="counter", name="counter", handler=counter))
    assert [runtime.invoke("counter") for _ in range(3)] == [1, 2, 3]
    state = runtime.synchronizer.get_local_state()
    assert state is not None and (state.version, state.data) == (3, {"count": 3})
    assert state.verify()
    pending = runtime.synchronizer.get_pending_changes()
    assert [(p["from_version"], p["version"], p["changes"]) for p in pending] == [
        (0, 1, {"count": 1}),
        (1, 2, {"count": 2}),
        (2, 3, {"count": 3}),
    ]


def test_local_handler_sees_state_version_and_an_empty_desired(runtime: EdgeRuntime) -> None:
    runtime.deploy(EdgeFunction(id="counter", name="counter", handler=counter))
    runtime.deploy(EdgeFunction(id="see", name="see", handler=see_context, timeout_seconds=5))
    runtime.invoke("counter")
    seen = runtime.invoke("see")
    assert seen["state"] == {"count": 1} and seen["version"] == 1 and seen["desired"] == {}
    assert 0 < seen["remaining_ms"] <= 5000
    assert runtime.synchronizer.get_local_state().version == 1  # type: ignore[union-attr]


def test_local_failed_and_timed_out_invocations_write_nothing(runtime: EdgeRuntime) -> None:
    runtime.deploy(EdgeFunction(id="counter", name="counter", handler=counter))
    runtime.deploy(
        EdgeFunction(id="bad", name="bad", handler=counter_then_fail, timeout_seconds=0.5)
    )
    runtime.invoke("counter")
    with pytest.raises(HandlerError):
        runtime.invoke("bad", "raise")
    with pytest.raises(FunctionTimeout):
        runtime.invoke("bad", "hang")
    state = runtime.synchronizer.get_local_state()
    assert state is not None and (state.version, state.data) == (1, {"count": 1})
    assert runtime.invoke("counter") == 2


def test_local_counter_survives_a_runtime_restart_with_a_store(tmp_path: Path) -> None:
    """With ``EdgeSynchronizer(Store(path))`` the state, its version and the pending deltas
    are in SQLite: a new runtime on the same file carries on counting."""
    db = tmp_path / "state.db"
    sync = EdgeSynchronizer(Store(db))
    with EdgeRuntime(NODE, max_workers=1, prestart=0, synchronizer=sync) as rt:
        rt.deploy(EdgeFunction(id="counter", name="counter", handler=counter))
        assert [rt.invoke("counter") for _ in range(2)] == [1, 2]
    sync.close()

    again = EdgeSynchronizer(Store(db))
    try:
        with EdgeRuntime(NODE, max_workers=1, prestart=0, synchronizer=again) as rt:
            rt.deploy(EdgeFunction(id="counter", name="counter", handler=counter))
            assert rt.invoke("counter") == 3
        state = again.get_local_state()
        assert state is not None and (state.version, state.data) == (3, {"count": 3})
        pending = again.get_pending_changes()
        assert [(p["from_version"], p["to_version"]) for p in pending] == [(0, 1), (1, 2), (2, 3)]
        assert pending[-1]["checksum"] == state.checksum
        again.confirm_sync(2)
        assert [p["to_version"] for p in again.get_pending_changes()] == [3]
    finally:
        again.close()


def test_worker_gets_a_changed_document_only_with_a_new_version(runtime: EdgeRuntime) -> None:
    """Warm workers cache the state by version: same version, same document (the pool's
    contract with its callers), a new version is sent again."""
    runtime.deploy(EdgeFunction(id="see", name="see", handler=see_context))
    pool = runtime.pool
    one = pool.invoke("see", context=ContextInput(1, {"a": 1}))
    cached = pool.invoke("see", context=ContextInput(1, {"a": "not resent"}))
    two = pool.invoke("see", context=ContextInput(2, {"a": 2}, 7, {"m": "x"}))
    assert one.value["state"] == cached.value["state"] == {"a": 1}
    assert one.worker_pid == cached.worker_pid == two.worker_pid
    assert two.value["state"] == {"a": 2} and two.value["desired"] == {"m": "x"}
    assert one.changes is None  # it wrote nothing


def test_handler_without_context_is_called_as_before(runtime: EdgeRuntime) -> None:
    runtime.deploy(EdgeFunction(id="add", name="add", handler=lambda a, b: a + b))
    assert runtime.invoke("add", 2, 3) == 5
    assert runtime.synchronizer.get_local_state() is None


# -- bugs ---------------------------------------------------------------------------------------


def test_concurrent_write_sets_are_last_writer_wins_per_key() -> None:
    """Two invocations finishing together, each writing its own key: both keys must stay.

    The interleaving is forced (the first caller pauses between reading the state and
    committing, while the second commits), so the race shows on every run.
    """
    first_read, second_done = threading.Event(), threading.Event()
    first = threading.current_thread()

    class PausingSynchronizer(EdgeSynchronizer):
        def context_input(self) -> tuple[int, dict[str, Any]]:
            read = super().context_input()
            if threading.current_thread() is first:
                first_read.set()
                second_done.wait(5)  # the window every concurrent caller can fall into
            return read

    sync = PausingSynchronizer()

    def second() -> None:
        first_read.wait(5)
        sync.apply_changes({"b": 1})
        second_done.set()

    other = threading.Thread(target=second)
    other.start()
    sync.context_input()  # the first invocation reads (and pauses while the second commits)
    sync.apply_changes({"a": 1})  # then its write set lands
    other.join(5)
    assert first_read.is_set() and second_done.is_set(), "the interleaving did not happen"
    state = sync.get_local_state()
    assert state is not None
    assert state.data == {"a": 1, "b": 1}, "the first write set reverted the second's key"


def test_edge_execution_error_is_the_base(runtime: EdgeRuntime) -> None:
    """A local invocation's failure after writing is an EdgeExecutionError like any other."""
    runtime.deploy(EdgeFunction(id="bad", name="bad", handler=counter_then_fail))
    with pytest.raises(EdgeExecutionError):
        runtime.invoke("bad", "raise")
