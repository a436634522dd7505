"""Handler state under bursts, worker kills and agent kills: no update is ever lost.

The bug these pin: the state an invocation read was taken when its request was queued, not
when it started executing, and its writes were committed after its worker had already moved
on, so a burst of counter invokes answered ``ok`` with ``1, 1, 1, ...`` and the cloud
mirror ended at 1. Everything here runs for real: one mosquitto per test, a real agent
process, real workers, the invokes published in one burst and the replies read off the wire.

The promise (docs/protocol.md, *Consistency of handler state*): an invocation reads a state
at least as new as every write committed before it started executing; with
``concurrency`` 1 and one function writing a key, N invocations of a counter give exactly
1..N; otherwise an invocation whose keys changed under it fails with ``conflict`` and writes
nothing, so the count always equals the number of ``ok`` replies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent import EdgeCluster
from agent.cloud.mirror import MirrorClient
from agent.errors import StateConflict
from agent.store import Store
from testing.agent_process import REPO, AgentProcess
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.specs import source_spec
from testing.wait import wait_for

NODE = "gw-test"
BASE = f"edge/nodes/{NODE}"
REPLIES = f"{BASE}/replies"
INVOKE = f"{BASE}/invoke"

AgentFactory = Callable[..., AgentProcess]

#: The README's counter: read, (optionally) take a while, write the incremented value.
COUNTER = """\
import os
import time


def handler(event, context):
    key = event.get('key', 'count')
    n = (context.state.get(key) or 0) + 1
    if event.get('delay'):
        time.sleep(event['delay'])
    if event.get('mark'):  # tell the test it has read, then wait for its go
        open(event['mark'], 'w').close()
        while not os.path.exists(event['gate']):
            time.sleep(0.005)
    context.state.set(key, n)
    return n
"""


def start_agent(agent_factory: AgentFactory, **runtime: Any) -> AgentProcess:
    # A queue deep enough for the whole burst: these tests are about state, not refusals.
    settings = {"max_workers": 4, "max_queue": 256, **runtime}
    return agent_factory(runtime=settings).start()


def deploy(cloud: Cloud, fid: str, concurrency: int) -> None:
    spec = source_spec(
        fid, COUNTER, entrypoint="counter:handler", concurrency=concurrency, timeout_seconds=60
    )
    cloud.deploy(None, spec)
    cloud.wait_message(
        f"{BASE}/functions/{fid}/state", lambda m: m["state"] == "active", timeout=15
    )


def burst(cloud: Cloud, fid: str, n: int, event: dict[str, Any]) -> list[str]:
    """Publish ``n`` invokes without waiting between them; their request ids, in order."""
    rids = [f"{fid}-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    infos = [
        cloud.client.publish(
            INVOKE,
            json.dumps({"request_id": rid, "function_id": fid, "payload": event}).encode(),
            qos=1,
        )
        for rid in rids
    ]
    for info in infos:
        info.wait_for_publish(10)
    return rids


def replies_for(cloud: Cloud, rids: list[str]) -> dict[str, list[dict[str, Any]]]:
    wanted = set(rids)
    out: dict[str, list[dict[str, Any]]] = {rid: [] for rid in rids}
    for reply in cloud.on(REPLIES):
        if reply.get("request_id") in wanted:
            out[reply["request_id"]].append(reply)
    return out


def wait_answered(
    cloud: Cloud, rids: list[str], timeout: float = 60.0
) -> dict[str, list[dict[str, Any]]]:
    def answered() -> dict[str, list[dict[str, Any]]] | None:
        replies = replies_for(cloud, rids)
        return replies if all(replies.values()) else None

    def missing() -> str:
        replies = replies_for(cloud, rids)
        return f"{sum(1 for r in replies.values() if not r)} of {len(rids)} invokes unanswered"

    try:
        return wait_for(answered, timeout, "not every invoke of the burst was answered")
    except pytest.fail.Exception:
        pytest.fail(missing())


def one_outcome(replies: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each request id's reply; a request answered twice must have been answered the same."""
    out = {}
    for rid, got in replies.items():
        distinct = {json.dumps({k: r.get(k) for k in ("ok", "result", "error")}) for r in got}
        assert len(distinct) == 1, f"{rid} got different replies: {got}"
        out[rid] = got[0]
    return out


def ok_results(outcomes: dict[str, dict[str, Any]]) -> list[int]:
    return sorted(r["result"] for r in outcomes.values() if r["ok"])


def edge_state(agent: AgentProcess) -> tuple[int, dict[str, Any]]:
    with Store(agent.state_dir / "state.db") as store:
        return store.sync_state()


def wait_mirror_equals_edge(mirror: MirrorClient, agent: AgentProcess) -> dict[str, Any]:
    version, data = edge_state(agent)
    state = mirror.mirror.wait_for(NODE, lambda s: s.version >= version, 20)
    assert state is not None, f"the mirror never reached the edge's version {version}"
    assert (state.version, state.data) == (version, data), "the mirror differs from the edge"
    assert state.verify()
    return data


# -- bursts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "delay"),
    [(12, 0.3), (12, 0.0), (200, 0.0)],
    ids=["12-slow", "12-fast", "200-fast"],
)
def test_burst_of_counter_invokes_with_concurrency_1_counts_exactly_1_to_n(
    cloud: Cloud, agent_factory: AgentFactory, mirror: MirrorClient, n: int, delay: float
) -> None:
    """A burst of N counter invokes published at once answered 1, 1, 1, ... (lost updates)."""
    agent = start_agent(agent_factory)
    deploy(cloud, "counter", concurrency=1)
    outcomes = one_outcome(wait_answered(cloud, burst(cloud, "counter", n, {"delay": delay})))
    assert ok_results(outcomes) == list(range(1, n + 1)), Counter(
        r["error"]["type"] for r in outcomes.values() if not r["ok"]
    )
    assert edge_state(agent)[1] == {"count": n}
    assert wait_mirror_equals_edge(mirror, agent) == {"count": n}


@pytest.mark.parametrize(("n", "delay"), [(12, 0.3), (200, 0.0)], ids=["12-slow", "200-fast"])
def test_burst_with_concurrency_4_never_loses_an_ok_update(
    cloud: Cloud, agent_factory: AgentFactory, mirror: MirrorClient, n: int, delay: float
) -> None:
    """With 4 invocations in parallel the count equals the ok replies; the rest are conflicts."""
    agent = start_agent(agent_factory)
    deploy(cloud, "counter", concurrency=4)
    outcomes = one_outcome(wait_answered(cloud, burst(cloud, "counter", n, {"delay": delay})))
    ok = ok_results(outcomes)
    assert ok == list(range(1, len(ok) + 1)), "ok results must be 1..k, each once"
    failed = [r["error"] for r in outcomes.values() if not r["ok"]]
    assert all(e["type"] == "conflict" and e["keys"] == ["count"] for e in failed), failed
    assert edge_state(agent)[1] == {"count": len(ok)}
    assert wait_mirror_equals_edge(mirror, agent) == {"count": len(ok)}


def test_two_functions_incrementing_the_same_key_lose_nothing(
    cloud: Cloud, agent_factory: AgentFactory, mirror: MirrorClient
) -> None:
    """Two functions writing one key concurrently: last writer won and increments vanished."""
    agent = start_agent(agent_factory)
    deploy(cloud, "inc-a", concurrency=1)
    deploy(cloud, "inc-b", concurrency=1)
    rids: list[str] = []
    for _ in range(5):  # interleaved bursts of both
        rids += burst(cloud, "inc-a", 10, {"delay": 0.01})
        rids += burst(cloud, "inc-b", 10, {"delay": 0.01})
    outcomes = one_outcome(wait_answered(cloud, rids))
    ok = ok_results(outcomes)
    assert ok == list(range(1, len(ok) + 1))
    conflicts = [r for r in outcomes.values() if not r["ok"]]
    assert all(r["error"]["type"] == "conflict" for r in conflicts), conflicts
    assert edge_state(agent)[1] == {"count": len(ok)}
    assert wait_mirror_equals_edge(mirror, agent) == {"count": len(ok)}


# -- faults in the middle of a burst ----------------------------------------------------------


def worker_pids(agent: AgentProcess) -> list[int]:
    assert agent.proc is not None
    return [
        p.pid
        for p in psutil.Process(agent.proc.pid).children(recursive=True)
        if "agent.exec.worker" in " ".join(p.cmdline())
    ]


def test_worker_killed_mid_burst_loses_no_ok_update(
    cloud: Cloud, agent_factory: AgentFactory, mirror: MirrorClient
) -> None:
    """SIGKILL of the function's worker from outside in the middle of a burst."""
    agent = start_agent(agent_factory)
    deploy(cloud, "counter", concurrency=1)
    rids = burst(cloud, "counter", 40, {"delay": 0.05})
    wait_for(
        lambda: sum(1 for r in replies_for(cloud, rids).values() if r) >= 10,
        30,
        "the first 10 invokes of the burst were never answered",
    )
    killed = worker_pids(agent)
    assert killed, "no worker process to kill"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    outcomes = one_outcome(wait_answered(cloud, rids))
    errors = Counter(r["error"]["type"] for r in outcomes.values() if not r["ok"])
    assert set(errors) <= {"worker_crashed"}, errors
    ok = ok_results(outcomes)
    assert ok == list(range(1, len(ok) + 1)) and len(ok) >= 30, (ok, errors)
    assert edge_state(agent)[1] == {"count": len(ok)}
    assert wait_mirror_equals_edge(mirror, agent) == {"count": len(ok)}


def test_agent_kill9_mid_burst_then_restart_loses_no_ok_update(
    cloud: Cloud, agent_factory: AgentFactory, mirror: MirrorClient
) -> None:
    """kill -9 of the agent during a burst, then a restart: the broker redelivers what was not
    acknowledged; the count equals the ok replies that reached the caller, mirror = edge."""
    agent = start_agent(agent_factory)
    deploy(cloud, "counter", concurrency=1)
    rids = burst(cloud, "counter", 60, {"delay": 0.02})
    wait_for(
        lambda: sum(1 for r in replies_for(cloud, rids).values() if r) >= 15,
        30,
        "the first 15 invokes of the burst were never answered",
    )
    agent.kill9()
    before = sum(1 for r in replies_for(cloud, rids).values() if r)
    assert before < len(rids), "the burst finished before the kill: nothing was tested"
    agent.start()
    outcomes = one_outcome(wait_answered(cloud, rids))
    failed = [r for r in outcomes.values() if not r["ok"]]
    assert not failed, failed
    assert ok_results(outcomes) == list(range(1, len(rids) + 1))
    assert edge_state(agent)[1] == {"count": len(rids)}
    assert wait_mirror_equals_edge(mirror, agent) == {"count": len(rids)}


def test_counter_survives_redeploy_of_the_same_version_and_restart(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """Between bursts: the same spec published again, and a clean agent restart."""
    agent = start_agent(agent_factory)
    deploy(cloud, "counter", concurrency=1)
    first = one_outcome(wait_answered(cloud, burst(cloud, "counter", 20, {})))
    spec = source_spec(
        "counter", COUNTER, entrypoint="counter:handler", concurrency=1, timeout_seconds=60
    )
    cloud.deploy(None, spec)  # the same version again: nothing changes
    second = one_outcome(wait_answered(cloud, burst(cloud, "counter", 20, {})))
    agent.stop()
    agent.start()
    third = one_outcome(wait_answered(cloud, burst(cloud, "counter", 20, {})))
    assert ok_results({**first, **second, **third}) == list(range(1, 61))
    assert edge_state(agent)[1] == {"count": 60}


# -- a conflict, seen from the cloud's side ----------------------------------------------------


def hold_slow_invoke(tmp_path: Path, name: str) -> tuple[dict[str, Any], Path, Path]:
    mark, gate = tmp_path / f"{name}.read", tmp_path / f"{name}.go"
    return {"mark": str(mark), "gate": str(gate)}, mark, gate


def test_conflict_raises_state_conflict_remotely_and_edgectl_exits_1(
    cloud: Cloud, broker: Mosquitto, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """A stale write set reaches the fleet API as StateConflict and edgectl invoke as exit 1."""
    start_agent(agent_factory)
    deploy(cloud, "slow", concurrency=1)
    deploy(cloud, "fast", concurrency=1)

    # The fleet API: slow reads count = 0, fast commits count = 1, slow's commit conflicts.
    event, mark, gate = hold_slow_invoke(tmp_path, "remote")
    outcome: list[Any] = []
    with EdgeCluster.connect("127.0.0.1", broker.port, timeout=10.0) as cluster:
        runtime = wait_for(lambda: cluster.get_runtime(NODE), 10, f"{NODE} never appeared")

        def call() -> None:
            try:
                outcome.append(runtime.invoke("slow", event))
            except Exception as exc:
                outcome.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        wait_for(mark.exists, 10, "the slow invocation never read the state")
        assert cloud.invoke(NODE, "fast", {})["result"] == 1
        gate.touch()
        caller.join(15)
    assert len(outcome) == 1 and isinstance(outcome[0], StateConflict), outcome
    assert outcome[0].keys == ["count"]

    # edgectl: the same race, exit code 1 and the error type on stderr.
    event, mark, gate = hold_slow_invoke(tmp_path, "ctl")
    ctl = subprocess.Popen(
        [
            *(sys.executable, "-m", "agent.cloud.ctl", "--broker", f"127.0.0.1:{broker.port}"),
            *("invoke", NODE, "slow", "--payload", json.dumps(event), "--timeout", "20"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(mark.exists, 15, "edgectl's invocation never read the state")
        assert cloud.invoke(NODE, "fast", {})["result"] == 2
        gate.touch()
        out, err = ctl.communicate(timeout=20)
    finally:
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait()
    assert ctl.returncode == 1, (out, err)
    assert "conflict" in err, err
    # nothing the conflicting invocations wrote was applied
    assert cloud.invoke(NODE, "fast", {})["result"] == 3
