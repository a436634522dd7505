"""State sync through a real agent process and a real mosquitto: writes, failures, offline
coalescing, kill -9, desired state, bad payloads and restores, seen from the wire.

Offline is made real and deterministic with :class:`conftest.TcpProxy`: the agent reaches the
broker only through a relay the test can cut, so the agent sees its connection die at once
while the broker, the recording cloud and the mirror stay connected. Invocations that change
state are held inside their handlers by a gate file until the uplink is cut, so their commits
happen while the agent knows it is offline, which is exactly when the outbox coalesces.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import TcpProxy

from agent.cloud.mirror import MirrorClient
from agent.store import Store
from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.checksum import wire_checksum
from testing.cloud import Cloud
from testing.specs import source_spec
from testing.wait import wait_for

NODE = "gw-test"
BASE = f"edge/nodes/{NODE}"
STATUS = f"{BASE}/status"
HEARTBEAT = f"{BASE}/heartbeat"
REPLIES = f"{BASE}/replies"
INVOKE = f"{BASE}/invoke"
DELTA = f"{BASE}/sync/delta"
SNAPSHOT = f"{BASE}/sync/snapshot"
DESIRED = f"{BASE}/sync/desired"
REQUEST = f"{BASE}/sync/request"

AgentFactory = Callable[..., AgentProcess]

#: One handler for every test: the event says what to write and how to end.
KV = """\
import os
import time


def handler(event, context):
    if 'gate' in event:
        with open(os.path.join(event['dir'], 'started-' + event['name']), 'a') as runs:
            runs.write('ran\\n')
        while not os.path.exists(event['gate']):
            time.sleep(0.005)
    for key, value in event.get('set', {}).items():
        context.state.set(key, value)
    for key in event.get('delete', []):
        context.state.delete(key)
    if 'big' in event:
        context.state.set('blob', 'x' * event['big'])
    if 'incr' in event:
        context.state.set(event['incr'], context.state.get(event['incr'], 0) + 1)
    op = event.get('op')
    if op == 'raise':
        raise RuntimeError('failed after writing')
    if op == 'hang':
        time.sleep(60)
    if op == 'crash':
        os._exit(3)
    if op == 'not_json':
        return {'set': {1, 2}}
    if op == 'write_desired':
        context.desired['mode'] = 'edge-wins'
    if op == 'surrogate':
        context.state.set('bad', '\\ud800')
    if op == 'quiet':
        return None
    return {
        'state': context.state.to_dict(),
        'version': context.state_version,
        'desired': dict(context.desired),
        'desired_version': context.desired_version,
    }
"""


# -- helpers -----------------------------------------------------------------------------------


def wait_online(cloud: Cloud, after: int = 0) -> None:
    wait_after(cloud, after, STATUS, lambda m: m["status"] == "online")


def wait_after(
    cloud: Cloud,
    after: int,
    topic: str,
    predicate: Callable[[dict[str, Any]], bool] = lambda m: True,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """The first message on ``topic`` recorded at index ``after`` or later that matches."""

    def find() -> dict[str, Any] | None:
        for message in messages_after(cloud, after, topic):
            if predicate(message):
                return message
        return None

    return wait_for(find, timeout, f"no matching message on {topic} after #{after}")  # type: ignore[no-any-return]


def messages_after(cloud: Cloud, after: int, topic: str) -> list[dict[str, Any]]:
    with cloud._lock:
        recorded = cloud.messages[after:]
    return [json.loads(p) for t, p, _ in recorded if t == topic and p]


def mark(cloud: Cloud) -> int:
    with cloud._lock:
        return len(cloud.messages)


def deploy_active(cloud: Cloud, fid: str, **over: Any) -> None:
    cloud.deploy(None, source_spec(fid, KV, entrypoint="kv_handler:handler", **over))
    cloud.wait_message(f"{BASE}/functions/{fid}/state", lambda m: m["state"] == "active")


def invoke(cloud: Cloud, fid: str, event: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    return cloud.invoke(NODE, fid, event, timeout=timeout)


def publish_invoke(cloud: Cloud, rid: str, fid: str, event: dict[str, Any]) -> None:
    cloud.publish(INVOKE, {"request_id": rid, "function_id": fid, "payload": event})


def stored_sync(agent: AgentProcess) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """(version, state, queued deltas) as in the agent's state.db, read beside the agent."""
    with Store(agent.state_dir / "state.db") as store:
        version, data = store.sync_state()
        deltas = [
            json.loads(i.payload) for i in store.outbox_peek(10_000) if i.kind == "sync_delta"
        ]
    return version, data, deltas


def log_count(agent: AgentProcess, text: str) -> int:
    return agent.log().count(text)


def wait_log_count(agent: AgentProcess, text: str, count: int, timeout: float = 10.0) -> None:
    wait_for(
        lambda: log_count(agent, text) >= count,
        timeout,
        f"agent log never said {text!r} {count} times:\n{agent.log()[-3000:]}",
    )


def runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_mirror(mirror: MirrorClient, version: int, timeout: float = 10.0) -> Any:
    state = mirror.mirror.wait_for(NODE, lambda s: s.version >= version, timeout)
    assert state is not None, f"the mirror never reached version {version}: {mirror.get(NODE)}"
    return state


def deltas_through(cloud: Cloud, version: int, after: int = 0) -> list[dict[str, Any]]:
    """The deltas the recording cloud has seen (from index ``after``), once it has seen the one
    reaching ``version`` (the mirror is another subscriber: it may have had it first)."""
    wait_after(cloud, after, DELTA, lambda m: m["to_version"] >= version)
    return messages_after(cloud, after, DELTA)


# -- writes reach the mirror --------------------------------------------------------------------


def test_handler_writes_reach_the_mirror(
    cloud: Cloud, agent_factory: AgentFactory, mirror: MirrorClient
) -> None:
    """Sets, nested values, increments and deletes arrive as contiguous deltas whose checksums
    hold; a mirror that was there from version 0 never needs a snapshot. One delta per
    change (no linger), so each one's boundaries can be checked."""
    agent = agent_factory(outbox={"delta_linger_ms": 0}).start()
    wait_online(cloud)
    deploy_active(cloud, "kv")

    invoke(cloud, "kv", {"set": {"temp": 21.5, "zone": {"name": "hall", "ids": [1, 2]}}})
    invoke(cloud, "kv", {"incr": "count"})
    invoke(cloud, "kv", {"incr": "count", "set": {"unicode": "Zürich ☃"}})
    reply = invoke(cloud, "kv", {"delete": ["temp"], "set": {"flag": False}})
    assert reply["ok"] is True, reply
    expected = {"zone": {"name": "hall", "ids": [1, 2]}, "count": 2, "unicode": "Zürich ☃"}
    expected["flag"] = False
    # the handler saw its own writes (deleted key gone) and the version it started from
    assert reply["result"]["state"] == expected and reply["result"]["version"] == 3

    state = wait_mirror(mirror, 4)
    assert state.data == expected and state.checksum == wire_checksum(expected)
    deltas = cloud.on(DELTA)
    assert [(d["from_version"], d["to_version"]) for d in deltas] == [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 4),
    ]
    assert deltas[-1]["changes"] == {"temp": None, "flag": False}
    assert mirror.mirror.snapshots_requested(NODE) == 0
    assert stored_sync(agent)[:2] == (4, expected)


def test_a_write_that_changes_nothing_sends_no_delta(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """Writing the value a key already has (or deleting a missing key) is not a new version."""
    agent = agent_factory(outbox={"delta_linger_ms": 0}).start()  # one delta per change
    wait_online(cloud)
    deploy_active(cloud, "kv")
    invoke(cloud, "kv", {"set": {"a": [1, {"b": 2}]}})
    same = invoke(cloud, "kv", {"set": {"a": [1, {"b": 2}]}, "delete": ["missing"]})
    assert same["ok"] is True
    invoke(cloud, "kv", {"set": {"a": 1.0}})  # 1.0 is not [..] and, on the wire, not 1 either
    invoke(cloud, "kv", {"set": {"a": 1}})
    deltas = deltas_through(cloud, 3)
    assert [(d["from_version"], d["to_version"], d["changes"]) for d in deltas] == [
        (0, 1, {"a": [1, {"b": 2}]}),
        (1, 2, {"a": 1.0}),
        (2, 3, {"a": 1}),
    ]
    assert stored_sync(agent)[0] == 3


# -- failed invocations write nothing -----------------------------------------------------------


def test_failed_and_timed_out_invocations_write_nothing(
    cloud: Cloud, agent_factory: AgentFactory, mirror: MirrorClient
) -> None:
    """A raise, a timeout, a worker crash and a non-JSON result each discard the invocation's
    writes: no delta, no new version, the mirror unchanged, the next handler sees the old state."""
    agent = agent_factory().start()
    wait_online(cloud)
    deploy_active(cloud, "kv")
    deploy_active(cloud, "kvshort", timeout_seconds=1)
    invoke(cloud, "kv", {"set": {"a": 1}})
    wait_mirror(mirror, 1)

    failures = {
        "handler_error": ("kv", {"set": {"a": 2, "b": 2}, "op": "raise"}),
        "timeout": ("kvshort", {"set": {"a": 3}, "delete": ["a"], "op": "hang"}),
        "worker_crashed": ("kv", {"set": {"a": 4}, "op": "crash"}),
        "not JSON": ("kv", {"set": {"a": 5}, "op": "not_json"}),
    }
    for what, (fid, event) in failures.items():
        reply = invoke(cloud, fid, event)
        assert reply["ok"] is False, (what, reply)
        assert what in (reply["error"]["type"], "not JSON"), (what, reply)
        assert stored_sync(agent)[:2] == (1, {"a": 1}), what

    seen = invoke(cloud, "kv", {})
    assert seen["result"]["state"] == {"a": 1} and seen["result"]["version"] == 1
    invoke(cloud, "kv", {"set": {"marker": True}})
    state = wait_mirror(mirror, 2)
    assert state.data == {"a": 1, "marker": True}
    # the outbox is in order, so every delta before the marker's has arrived by now
    assert [(d["from_version"], d["changes"]) for d in deltas_through(cloud, 2)] == [
        (0, {"a": 1}),
        (1, {"marker": True}),
    ]
    assert mirror.mirror.snapshots_requested(NODE) == 0


def test_handler_cannot_write_desired_state(cloud: Cloud, agent_factory: AgentFactory) -> None:
    """context.desired is read-only: a handler writing it fails, and its state writes go too."""
    agent_factory().start()
    wait_online(cloud)
    deploy_active(cloud, "kv")
    reply = invoke(cloud, "kv", {"set": {"a": 1}, "op": "write_desired"})
    assert reply["ok"] is False and reply["error"]["type"] == "handler_error", reply
    assert "does not support item assignment" in reply["error"]["message"]
    assert invoke(cloud, "kv", {})["result"]["version"] == 0


# -- offline: coalescing, kill -9 ---------------------------------------------------------------


def hold_invocations(
    cloud: Cloud, tmp_path: Path, count: int, event: Callable[[int], dict[str, Any]]
) -> tuple[Path, list[str]]:
    """Publish ``count`` invocations of ``kv`` that wait inside the handler for a gate file;
    returns (gate, request ids) once every one of them has started."""
    gate = tmp_path / f"gate-{uuid.uuid4().hex[:6]}"
    rids = []
    for i in range(count):
        rid = f"held-{i}-{uuid.uuid4().hex[:6]}"
        rids.append(rid)
        body = {"name": rid, "dir": str(tmp_path), "gate": str(gate), **event(i)}
        publish_invoke(cloud, rid, "kv", body)
    wait_for(
        lambda: all((tmp_path / f"started-{rid}").exists() for rid in rids),
        15,
        f"not all {count} held invocations started",
    )
    return gate, rids


def go_offline(agent: AgentProcess, uplink: TcpProxy) -> None:
    lost = log_count(agent, "lost the broker")
    uplink.cut()
    wait_log_count(agent, "lost the broker", lost + 1)


def test_changes_made_offline_coalesce_into_one_delta(
    cloud: Cloud,
    agent_factory: AgentFactory,
    mirror: MirrorClient,
    uplink: TcpProxy,
    tmp_path: Path,
) -> None:
    """Six invocations that commit while the agent is offline reach the cloud as ONE delta
    (from the last version it had to the final one, final values, the right checksum), the
    mirror converges without a snapshot, and the broker's redelivery of the six invokes
    (never acknowledged on the lost connection) does not apply their writes again.

    Covered: commits made while the agent knows it is disconnected, then a reconnect.
    Not covered here: commits while connected but with the broker not acknowledging (the
    outbox keeps up to 64 messages in flight, which are not coalesced); see the sync bench.
    """
    agent = agent_factory(port=uplink.port, runtime={"max_workers": 6}).start()
    wait_online(cloud)
    deploy_active(cloud, "kv", concurrency=6, timeout_seconds=30)
    invoke(cloud, "kv", {"set": {"base": 0}})
    wait_mirror(mirror, 1)

    gate, rids = hold_invocations(
        # "quiet": the reply does not list the document, which would read every key
        cloud,
        tmp_path,
        6,
        lambda i: {"set": {f"k{i}": i * 10}, "op": "quiet"},
    )
    go_offline(agent, uplink)
    before = mark(cloud)
    gate.touch()
    wait_for(lambda: stored_sync(agent)[0] == 7, 15, "the six held invocations did not commit")
    _, data, queued = stored_sync(agent)
    assert [(d["from_version"], d["to_version"]) for d in queued] == [(1, 7)]
    # all six started from version 1 and wrote keys of their own: none conflicts
    assert {data[f"k{i}"] for i in range(6)} == {0, 10, 20, 30, 40, 50}

    uplink.restore()
    wait_online(cloud, before)
    state = wait_mirror(mirror, 7)
    assert state.data == data and state.checksum == wire_checksum(data)
    wire = deltas_through(cloud, 7, before)
    assert len(wire) == 1, wire
    assert wire[0]["from_version"] == 1 and wire[0]["to_version"] == 7
    assert wire[0]["changes"] == {k: v for k, v in data.items() if k != "base"}
    assert wire[0]["checksum"] == wire_checksum(data)
    assert mirror.mirror.snapshots_requested(NODE) == 0
    for rid in rids:
        wait_after(cloud, before, REPLIES, lambda m, rid=rid: m["request_id"] == rid)

    # Acknowledged once accepted (agent/store/accepted.py), so the broker has nothing to
    # redeliver; either way no request id gets a second reply (issue 12).
    assert log_count(agent, "resending its reply") == 0
    replies = [m["request_id"] for m in messages_after(cloud, before, REPLIES)]
    assert all(replies.count(rid) == 1 for rid in rids), replies
    assert all(runs(tmp_path / f"started-{rid}") == 1 for rid in rids)
    assert stored_sync(agent)[0] == 7
    assert len(messages_after(cloud, before, DELTA)) == 1


def test_unsent_deltas_survive_kill9_and_reach_the_mirror(
    cloud: Cloud,
    agent_factory: AgentFactory,
    mirror: MirrorClient,
    uplink: TcpProxy,
    tmp_path: Path,
) -> None:
    """Changes committed offline are on disk: after kill -9 and a restart they are delivered
    and the mirror converges; the redelivered invokes are answered from the dedupe window
    and do not run again."""
    agent = agent_factory(port=uplink.port, runtime={"max_workers": 3}).start()
    wait_online(cloud)
    deploy_active(cloud, "kv", concurrency=3, timeout_seconds=30)
    gate, rids = hold_invocations(
        cloud, tmp_path, 3, lambda i: {"set": {f"k{i}": [i]}, "op": "quiet"}
    )
    go_offline(agent, uplink)
    gate.touch()
    wait_for(lambda: stored_sync(agent)[0] == 3, 15, "the held invocations did not commit")
    _, data, queued = stored_sync(agent)
    assert [(d["from_version"], d["to_version"]) for d in queued] == [(0, 3)]

    agent.kill9()
    assert cloud.on(DELTA) == []
    before = mark(cloud)
    agent.start()
    agent.wait_log("restored 1 deployed functions")
    uplink.restore()
    wait_online(cloud, before)
    state = wait_mirror(mirror, 3)
    assert state.data == data == {"k0": [0], "k1": [1], "k2": [2]}
    assert state.checksum == wire_checksum(data)
    assert [(d["from_version"], d["to_version"]) for d in deltas_through(cloud, 3)] == [(0, 3)]
    for rid in rids:
        wait_after(cloud, before, REPLIES, lambda m, rid=rid: m["request_id"] == rid)
    assert all(runs(tmp_path / f"started-{rid}") == 1 for rid in rids)
    assert stored_sync(agent)[0] == 3


# -- desired state ------------------------------------------------------------------------------


def test_desired_state_round_trip(
    cloud: Cloud, agent_factory: AgentFactory, mirror: MirrorClient
) -> None:
    """mirror.set_desired reaches context.desired; the applied version shows in heartbeats and
    in the status message; an older desired version is ignored, also after a restart."""
    agent = agent_factory().start()
    wait_online(cloud)
    deploy_active(cloud, "kv")
    assert mirror.set_desired(NODE, {"mode": "eco"}) == 1
    agent.wait_log("applied desired state version 1")
    reply = invoke(cloud, "kv", {"set": {"mode_seen": "eco"}})
    assert reply["result"]["desired"] == {"mode": "eco"}
    assert reply["result"]["desired_version"] == 1
    start = mark(cloud)
    beat = wait_after(cloud, start, HEARTBEAT, lambda m: m["sync"]["desired_version"] == 1)
    assert beat["sync"] == {"version": 1, "desired_version": 1}

    assert mirror.set_desired(NODE, {"mode": "boost", "limits": {"max": 3}}) == 2
    agent.wait_log("applied desired state version 2")
    cloud.publish(DESIRED, {"version": 1, "data": {"mode": "stale"}}, retain=True)
    agent.wait_log("desired version 1 is not newer than 2")
    reply = invoke(cloud, "kv", {})
    assert reply["result"]["desired"] == {"mode": "boost", "limits": {"max": 3}}
    assert reply["result"]["desired_version"] == 2

    before = mark(cloud)
    agent.stop()
    offline = wait_after(cloud, before, STATUS, lambda m: m["status"] == "offline")
    assert offline["sync"] == {"version": 1, "desired_version": 2}
    agent.start()
    online = wait_after(cloud, before, STATUS, lambda m: m["status"] == "online")
    assert online["sync"] == {"version": 1, "desired_version": 2}
    # the retained (older) version 1 arrived again on subscribe and was ignored again
    wait_log_count(agent, "desired version 1 is not newer than 2", 2)
    assert invoke(cloud, "kv", {})["result"]["desired"]["mode"] == "boost"


# -- bad payloads -------------------------------------------------------------------------------


BAD_DESIRED: list[Any] = [
    b"not json",
    b"",  # clears the retained message: not an error, keeps what was applied
    {"data": {"mode": "x"}},
    {"version": "9", "data": {"mode": "x"}},
    {"version": 9, "data": ["mode", "x"]},
    {"version": 9, "data": {"mode": "x"}, "checksum": "0" * 64},
    {"version": True, "data": {"mode": "x"}},
]
BAD_REQUESTS: list[Any] = [b"", b"{", {"id": "r1"}, {"request_id": 5}, {"request_id": ""}, [1]]


def test_bad_sync_payloads_are_logged_and_change_nothing(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """Garbage on sync/desired and sync/request is logged and ignored: desired and reported
    state stay as they were, no snapshot goes out, and the agent keeps serving."""
    agent = agent_factory().start()
    wait_online(cloud)
    deploy_active(cloud, "kv")
    cloud.publish(DESIRED, {"version": 1, "data": {"mode": "eco"}}, retain=True)
    agent.wait_log("applied desired state version 1")
    invoke(cloud, "kv", {"set": {"a": 1}})

    for payload in BAD_DESIRED:
        cloud.publish(DESIRED, payload, retain=True)
    for payload in BAD_REQUESTS:
        cloud.publish(REQUEST, payload)
    wait_log_count(agent, "ignoring bad sync/desired", len(BAD_DESIRED) - 1)
    wait_log_count(agent, "ignoring bad sync/request", len(BAD_REQUESTS))

    reply = invoke(cloud, "kv", {})
    assert reply["ok"] is True
    assert reply["result"]["desired"] == {"mode": "eco"} and reply["result"]["desired_version"] == 1
    assert reply["result"]["state"] == {"a": 1} and reply["result"]["version"] == 1
    assert cloud.on(SNAPSHOT) == []
    assert "Traceback" not in agent.log()
    # and the topics still work
    cloud.publish(REQUEST, {"request_id": "good-1"})
    snap = cloud.wait_message(SNAPSHOT, lambda m: m["request_id"] == "good-1")
    assert snap["version"] == 1 and snap["data"] == {"a": 1}
    assert snap["checksum"] == wire_checksum({"a": 1})


# -- restores -----------------------------------------------------------------------------------


def test_restored_old_state_db_is_detected_and_resets_the_mirror(
    cloud: Cloud, agent_factory: AgentFactory, mirror: MirrorClient, tmp_path: Path
) -> None:
    """state.db restored from an older backup (sync.hwm left in place): the agent logs it,
    moves its version past every version it ever sent, and sends an unsolicited
    ``restore-...`` snapshot that the mirror takes even though it is older data."""
    agent = agent_factory().start()
    wait_online(cloud)
    deploy_active(cloud, "kv")
    invoke(cloud, "kv", {"incr": "count"})
    invoke(cloud, "kv", {"incr": "count", "set": {"phase": "backup"}})
    agent.stop()  # graceful: the WAL is checkpointed into state.db
    db = agent.state_dir / "state.db"
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    backup = tmp_path / "state.db.backup"
    shutil.copy2(db, backup)

    agent.start()
    for _ in range(3):
        invoke(cloud, "kv", {"incr": "count", "set": {"phase": "after"}})
    wait_mirror(mirror, 5)
    assert int((agent.state_dir / "sync.hwm").read_text()) == 5
    agent.stop()

    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copy2(backup, db)
    before = mark(cloud)
    agent.start()
    agent.wait_log("restored from an older backup?")
    assert "holds sync version 2 but version 5 was committed before" in agent.log()
    snap = wait_after(cloud, before, SNAPSHOT, lambda m: m["request_id"].startswith("restore-"))
    restored = {"count": 2, "phase": "backup"}
    assert snap["version"] == 6 and snap["data"] == restored
    assert snap["checksum"] == wire_checksum(restored)
    state = wait_mirror(mirror, 6)
    assert state.data == restored

    reply = invoke(cloud, "kv", {"incr": "count"})
    assert reply["result"]["version"] == 6 and reply["result"]["state"]["count"] == 3
    state = wait_mirror(mirror, 7)
    assert state.data == {"count": 3, "phase": "backup"}
    assert int((agent.state_dir / "sync.hwm").read_text()) == 7
    assert mirror.mirror.snapshots_requested(NODE) == 0


def test_restart_without_restore_sends_no_snapshot(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """A plain restart keeps version and data and does not look like a restore."""
    agent = agent_factory().start()
    wait_online(cloud)
    deploy_active(cloud, "kv")
    invoke(cloud, "kv", {"incr": "count"})
    agent.stop()
    before = mark(cloud)
    agent.start()
    wait_online(cloud, before)
    reply = invoke(cloud, "kv", {"incr": "count"})
    assert reply["result"]["version"] == 1 and reply["result"]["state"] == {"count": 2}
    assert "older backup" not in agent.log()
    assert cloud.on(SNAPSHOT) == []


# -- bugs ---------------------------------------------------------------------------------------


def test_state_value_that_is_not_utf8_gets_an_error_reply(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """A handler writing '\\ud800' (valid JSON, no UTF-8) must get an error reply and change
    nothing; the agent answered nothing at all (a "bug while handling _InvokeDone")."""
    agent = agent_factory().start()
    wait_online(cloud)
    deploy_active(cloud, "kv")
    try:
        reply = invoke(cloud, "kv", {"op": "surrogate"}, timeout=3)
    finally:
        assert invoke(cloud, "kv", {})["ok"] is True  # it still serves others
    assert reply["ok"] is False and reply["error"]["type"] == "handler_error", reply
    assert stored_sync(agent)[0] == 0
    assert "bug while handling" not in agent.log()


def test_state_write_over_max_payload_does_not_block_the_outbox(
    agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """A write whose delta is over agent.max_payload_bytes must be refused with an error
    reply (as an over-size reply is), not published to a broker that enforces the size."""
    (tmp_path / "small-broker").mkdir()
    small = Mosquitto(tmp_path / "small-broker")
    small.conf.write_text(small.conf.read_text() + "max_packet_size 8192\n")
    small.start()
    cloud = Cloud(small.port)
    try:
        agent = agent_factory(port=small.port, agent={"max_payload_bytes": 4096}).start()
        wait_online(cloud)
        deploy_active(cloud, "kv")
        rid = f"big-{uuid.uuid4().hex[:6]}"
        publish_invoke(cloud, rid, "kv", {"big": 10_000, "op": "quiet"})
        reply = cloud.wait_message(REPLIES, lambda m: m["request_id"] == rid, timeout=3)
        assert reply["ok"] is False, reply
        after = invoke(cloud, "kv", {"set": {"small": 1}}, timeout=5)
        assert after["ok"] is True
        assert "lost the broker" not in agent.log(), "the broker dropped the agent for a delta"
    finally:
        cloud.close()
        small.stop()
