"""Attacks on the loop's own worker path (issue 15): the daemon sends an invocation to an
idle warm worker itself and waits for its result fd in its own poll; an accepted invoke goes
on record only once it has run ``agent.record_accepted_after_s``; the worker gets the request's
own JSON. Real broker, real agent process, real workers.

Hostile workers find their result fd the way any handler could: the worker's command line
(``python -I -B -c <bootstrap> <root> <rfd> <wfd> <codec> <ppid>``).

The tests that share one agent match their replies by a request id of their own.
"""

from __future__ import annotations

import json
import signal
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w

from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.specs import source_spec
from testing.wait import wait_for

NODE = "gw-hot"
REPLIES = f"edge/nodes/{NODE}/replies"
INVOKE = f"edge/nodes/{NODE}/invoke"
STATUS = f"edge/nodes/{NODE}/status"

ECHO = "def handler(event):\n    return {'echo': event}\n"
PID = "import os\n\n\ndef handler(event):\n    return os.getpid()\n"
# A worker that writes the start of a result frame (it says 1000 bytes follow), then sleeps.
PARTIAL = """\
import os
import struct
import sys
import time


def handler(event):
    if event is None:
        return 'warm'
    os.write(int(sys.argv[3]), struct.pack('!II', 1, 999) + b'R' + b'[1,')
    time.sleep(event)
    return 'late'
"""
# A whole frame whose header is not a message: a protocol breach.
GARBAGE = """\
import os
import struct
import sys
import time


def handler(event):
    if event is None:
        return 'warm'
    os.write(int(sys.argv[3]), struct.pack('!II', 3, 0) + b'{{{')
    time.sleep(30)
"""
# Trickles a valid result one byte at a time (the loop reads what it can, never waits).
TRICKLE = """\
import os
import struct
import sys
import time


def handler(event):
    if event is None:
        return 'warm'
    body = b'"' + b'x' * 200 + b'"'
    frame = struct.pack('!II', 2, len(body)) + b'R0' + body
    for i in range(len(frame)):
        os.write(int(sys.argv[3]), frame[i : i + 1])
        time.sleep(0.002)
    os._exit(0)  # the real result must never be read: the trickled one was the answer
"""
# Marks that it runs (a file named after the event's name), then sleeps.
MARKED = """\
import os
import time


def handler(event):
    if event is None:
        return 'warm'
    path = os.path.join(os.environ['MARK_DIR'], event['name'])
    with open(path, 'a') as mark:
        mark.write(f'{os.getpid()}\\n')
    time.sleep(event.get('sleep', 0))
    with open(path) as mark:
        return {'runs': len(mark.read().splitlines()), 'pid': os.getpid(), 'v': VERSION}


VERSION = '__V__'
"""
CTX = "def handler(event, context):\n    return {'ctx': event}\n"
BIG_RESULT = "def handler(event):\n    return 'r' * event\n"


def marked(version: str = "1") -> str:
    return MARKED.replace("__V__", version)


class Served:
    def __init__(self, broker: Mosquitto, agent: AgentProcess, mark_dir: Path) -> None:
        self.broker = broker
        self.agent = agent
        self.mark_dir = mark_dir


def wait_active(cloud: Cloud, fid: str, version: str = "1") -> None:
    cloud.wait_message(
        f"edge/nodes/{NODE}/functions/{fid}/state",
        lambda m: m["state"] == "active" and str(m.get("version")) == version,
        timeout=20,
    )


def agent_config(workdir: Path, port: int, **agent: Any) -> AgentProcess:
    return AgentProcess(
        workdir,
        port,
        NODE,
        agent={"max_payload_bytes": 512 * 1024, "shutdown_grace_s": 1.0, **agent},
        runtime={"function_uids": "", "max_workers": 4, "max_queue": 16},
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("hot")
    mark_dir = workdir / "marks"
    mark_dir.mkdir()
    broker = Mosquitto(workdir).start()
    agent = agent_config(workdir, broker.port).start()
    cloud = Cloud(broker.port)
    try:
        cloud.wait_message(STATUS, lambda m: m["status"] == "online")
        specs = [
            source_spec("echo", ECHO, concurrency=4),
            source_spec("partial", PARTIAL, timeout_seconds=2),
            source_spec("garbage", GARBAGE, timeout_seconds=20),
            source_spec("trickle", TRICKLE, timeout_seconds=10),
            source_spec("marked", marked(), environment={"MARK_DIR": str(mark_dir)}),
            source_spec("ctx", CTX, concurrency=2),
            source_spec("big", BIG_RESULT),
        ]
        for spec in specs:
            cloud.deploy(NODE, spec)
        for spec in specs:
            wait_active(cloud, spec["id"])
    finally:
        cloud.close()
    yield Served(broker, agent, mark_dir)
    agent.stop()
    broker.stop()


@pytest.fixture
def cloud(served: Served) -> Iterator[Cloud]:
    c = Cloud(served.broker.port)
    yield c
    c.close()


def send(cloud: Cloud, fid: str, payload: Any, rid: str | None = None, **extra: Any) -> str:
    rid = rid or f"{fid}-{uuid.uuid4().hex}"
    cloud.publish(INVOKE, {"request_id": rid, "function_id": fid, "payload": payload, **extra})
    return rid


def replies_to(cloud: Cloud, rid: str, topic: str = REPLIES) -> list[dict[str, Any]]:
    return [m for m in cloud.on(topic) if m.get("request_id") == rid]


def reply_to(cloud: Cloud, rid: str, timeout: float = 15.0, topic: str = REPLIES) -> dict[str, Any]:
    return cloud.wait_message(topic, lambda m: m.get("request_id") == rid, timeout)


def warm(cloud: Cloud, fid: str) -> None:
    reply = reply_to(cloud, send(cloud, fid, None))
    assert reply["ok"] is True, reply


def assert_still_serving(cloud: Cloud) -> None:
    reply = cloud.invoke(NODE, "echo", "still there?")
    assert reply["ok"] is True and reply["result"] == {"echo": "still there?"}, reply


def workers_of(agent: AgentProcess) -> set[int]:
    return {p.pid for p in psutil.Process(agent.pid).children(recursive=True)}


# -- hostile workers: the loop must never wait for one ---------------------------------------


def test_a_partial_frame_then_sleep_stalls_nothing_and_times_out(
    served: Served, cloud: Cloud
) -> None:
    """The worker writes 9 of a 1008-byte frame and sleeps: the loop keeps answering others
    while it waits, and at the deadline (2 s) the call is answered timeout, the worker killed."""
    warm(cloud, "partial")
    stuck = send(cloud, "partial", 60)
    for n in range(5):  # each answered while the half frame sits in the loop's reader
        reply = cloud.invoke(NODE, "echo", n, timeout=5)
        assert reply["result"] == {"echo": n}
    assert replies_to(cloud, stuck) == [], "answered before its deadline"
    reply = reply_to(cloud, stuck, timeout=10)
    assert reply["ok"] is False and reply["error"]["type"] == "timeout", reply
    assert reply["duration_ms"] < 5000, reply
    again = reply_to(cloud, send(cloud, "partial", None))  # a fresh worker serves it
    assert again["ok"] is True and again["result"] == "warm", again
    assert len(replies_to(cloud, stuck)) == 1


def test_a_garbage_frame_is_worker_crashed_at_once_not_at_the_deadline(cloud: Cloud) -> None:
    warm(cloud, "garbage")
    rid = send(cloud, "garbage", 1)
    reply = reply_to(cloud, rid, timeout=10)
    assert reply["ok"] is False and reply["error"]["type"] == "worker_crashed", reply
    assert reply["duration_ms"] < 10_000, reply  # the protocol breach, not the 20 s deadline
    assert_still_serving(cloud)


def test_a_result_trickled_byte_by_byte_is_read_whole_and_answered_once(cloud: Cloud) -> None:
    warm(cloud, "trickle")
    rid = send(cloud, "trickle", 1)
    echoes = [send(cloud, "echo", n) for n in range(3)]  # interleaved with the trickle
    reply = reply_to(cloud, rid)
    assert reply["ok"] is True and reply["result"] == "x" * 200, reply
    for n, erid in enumerate(echoes):
        assert reply_to(cloud, erid)["result"] == {"echo": n}
    assert len(replies_to(cloud, rid)) == 1


# -- payloads --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [10, 40_000, 49_000, 60_000, 300_000])
def test_payloads_around_the_direct_limit_reach_the_handler_intact(cloud: Cloud, size: int) -> None:
    """Under 48 KiB the loop writes the request to the worker itself; over it, a thread
    does (the write could wait for the worker). Either way the handler gets the payload."""
    payload = {"s": "a" * size, "n": [1.5, None, True], "u": "é✓\U0001f680"}
    reply = cloud.invoke(NODE, "echo", payload, timeout=15)
    assert reply["ok"] is True and reply["result"] == {"echo": payload}


def test_a_large_result_from_a_direct_call_is_answered(cloud: Cloud) -> None:
    reply = cloud.invoke(NODE, "big", 400_000, timeout=20)
    assert reply["ok"] is True, reply
    assert reply["result"] == "r" * 400_000


# -- duplicates, concurrency, context --------------------------------------------------------


def test_a_duplicate_while_running_runs_once_and_is_answered_once(
    served: Served, cloud: Cloud
) -> None:
    warm(cloud, "marked")
    name = f"dup-{uuid.uuid4().hex}"
    rid = send(cloud, "marked", {"name": name, "sleep": 0.5})
    wait_for((served.mark_dir / name).exists, 10, "the first copy never started")
    send(cloud, "marked", {"name": name, "sleep": 0.5}, rid=rid)  # same id, same address
    other = f"edge/custom/{uuid.uuid4().hex}"
    send(cloud, "marked", {"name": name, "sleep": 0.5}, rid=rid, reply_to=other)
    reply = reply_to(cloud, rid)
    assert reply["ok"] is True and reply["result"]["runs"] == 1, reply
    second = reply_to(cloud, rid, topic=other)
    assert second["result"] == reply["result"]
    assert_still_serving(cloud)  # by now a doubled reply would have arrived too
    assert len(replies_to(cloud, rid)) == 1
    assert len(replies_to(cloud, rid, other)) == 1


def test_a_burst_with_concurrency_and_a_context_handler_mixed_in(cloud: Cloud) -> None:
    """Stateless calls (direct when a warm worker idles, else on threads) interleaved with
    a handler that takes a context (never direct): every call answered once, correctly."""
    sent: dict[str, Any] = {}
    for n in range(24):
        fid = "ctx" if n % 3 == 0 else "echo"
        sent[send(cloud, fid, n)] = (fid, n)

    def all_in() -> bool:
        return all(replies_to(cloud, rid) for rid in sent)

    wait_for(all_in, 30, "not every call of the burst was answered")
    for rid, (fid, n) in sent.items():
        [reply] = replies_to(cloud, rid)
        assert reply["ok"] is True, reply
        assert reply["result"] == ({"ctx": n} if fid == "ctx" else {"echo": n})


def test_fast_calls_leave_no_accepted_record(served: Served, cloud: Cloud) -> None:
    rids = [send(cloud, "echo", n) for n in range(20)]
    for rid in rids:
        reply_to(cloud, rid)
    on_record = set(served.agent.accepted_on_record())
    assert not on_record & set(rids), on_record


# -- the function changes under a running call -----------------------------------------------


def test_redeploy_while_the_loop_holds_its_worker(served: Served, cloud: Cloud) -> None:
    """A new version lands while v1 runs in a worker the loop waits for: v1's call is
    answered by v1, the next by v2 in a new worker, and v1's worker goes."""
    spec = source_spec("marked", marked(), environment={"MARK_DIR": str(served.mark_dir)})
    cloud.deploy(NODE, spec)
    wait_active(cloud, "marked")
    warm(cloud, "marked")
    name = f"redeploy-{uuid.uuid4().hex}"
    rid = send(cloud, "marked", {"name": name, "sleep": 1.5})
    wait_for((served.mark_dir / name).exists, 10, "v1 never started")
    v2 = source_spec(
        "marked", marked("2"), version="2", environment={"MARK_DIR": str(served.mark_dir)}
    )
    cloud.deploy(NODE, v2)
    wait_active(cloud, "marked", "2")
    old = reply_to(cloud, rid)
    assert old["ok"] is True and old["result"]["v"] == "1", old
    new = cloud.invoke(NODE, "marked", {"name": f"n-{name}"})
    assert new["ok"] is True and new["result"]["v"] == "2", new
    assert new["result"]["pid"] != old["result"]["pid"]
    wait_for(lambda: not psutil.pid_exists(old["result"]["pid"]), 10, "v1's worker outlived it")
    cloud.deploy(NODE, spec)  # back to v1 for the other tests (a version of its own)
    wait_active(cloud, "marked")


def test_undeploy_while_the_loop_holds_its_worker(served: Served, cloud: Cloud) -> None:
    spec = source_spec(
        "gone", MARKED.replace("__V__", "g"), environment={"MARK_DIR": str(served.mark_dir)}
    )
    cloud.deploy(NODE, spec)
    wait_active(cloud, "gone")
    warm(cloud, "gone")
    name = f"undeploy-{uuid.uuid4().hex}"
    rid = send(cloud, "gone", {"name": name, "sleep": 1.0})
    wait_for((served.mark_dir / name).exists, 10, "the call never started")
    pid = int((served.mark_dir / name).read_text().split()[0])
    cloud.publish(f"edge/nodes/{NODE}/functions/gone", b"", retain=True)
    reply = reply_to(cloud, rid)
    assert len(replies_to(cloud, rid)) == 1
    assert reply["ok"] is True or reply["error"]["type"] == "worker_crashed", reply
    wait_for(lambda: not psutil.pid_exists(pid), 10, "the undeployed function's worker stayed")
    later = cloud.invoke(NODE, "gone", {"name": "x"})
    assert later["ok"] is False and later["error"]["type"] == "function_not_found", later
    assert_still_serving(cloud)


# -- one agent per test: signals, crashes, config --------------------------------------------


MARK_ENV = "MARK_DIR"


OwnAgent = Callable[..., AgentProcess]


@pytest.fixture
def own_agent(tmp_path: Path, broker: Mosquitto, own_cloud: Cloud) -> Iterator[OwnAgent]:
    """An agent of the test's own (``[agent]`` settings as keywords), stopped at teardown:
    started, online and with ``marked`` deployed; ``start=False`` returns it unstarted."""
    agents: list[AgentProcess] = []

    def make(*, start: bool = True, **agent: Any) -> AgentProcess:
        made = agent_config(tmp_path, broker.port, **agent)
        agents.append(made)
        if not start:
            return made
        made.start()
        own_cloud.wait_message(STATUS, lambda m: m["status"] == "online")
        spec = source_spec(
            "marked", marked(), timeout_seconds=30, environment={MARK_ENV: str(tmp_path)}
        )
        own_cloud.deploy(NODE, spec)
        wait_active(own_cloud, "marked")
        return made

    yield make
    for agent in agents:
        agent.stop()


@pytest.fixture
def own_cloud(broker: Mosquitto) -> Iterator[Cloud]:
    c = Cloud(broker.port)
    yield c
    c.close()


def test_sigterm_past_the_grace_kills_the_direct_worker_and_a_recorded_call_runs_again(
    tmp_path: Path, own_agent: OwnAgent, own_cloud: Cloud
) -> None:
    """A direct call on record (ran past 0.2 s) still running when the 1 s grace ends: the
    agent exits 0 without a worker left, and after the restart the call runs again and is
    answered exactly once."""
    cloud = own_cloud
    agent = own_agent(record_accepted_after_s=0.2)
    warm(cloud, "marked")
    name = f"term-{uuid.uuid4().hex}"
    rid = send(cloud, "marked", {"name": name, "sleep": 4})
    wait_for((tmp_path / name).exists, 10, "the call never started")
    wait_for(lambda: rid in agent.accepted_on_record(), 10, "never put on record")
    pid = int((tmp_path / name).read_text().split()[0])
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit() == 0
    wait_for(lambda: not psutil.pid_exists(pid), 5, "the direct worker outlived the agent")
    assert replies_to(cloud, rid) == []
    agent.start()
    reply = reply_to(cloud, rid, timeout=20)
    assert reply["ok"] is True and reply["result"]["runs"] == 2, reply
    assert_answered_once_after(cloud, agent, rid)


def assert_answered_once_after(cloud: Cloud, agent: AgentProcess, rid: str) -> None:
    """Nothing else is still coming for ``rid``: a later call round-trips, then one reply."""
    deploy = source_spec("echo", ECHO)
    cloud.deploy(NODE, deploy)
    wait_active(cloud, "echo")
    assert cloud.invoke(NODE, "echo", 1)["ok"] is True
    wait_for(lambda: rid not in agent.accepted_on_record(), 10, "the record stayed")
    assert len(replies_to(cloud, rid)) == 1, replies_to(cloud, rid)


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_a_call_not_yet_on_record_comes_back_from_the_broker_after_a_stop(
    tmp_path: Path, own_agent: OwnAgent, own_cloud: Cloud, how: str
) -> None:
    """The lazy record's window: a call still running, not yet due to go on record (30 s),
    when the agent goes (grace over, or kill -9). Unacknowledged, the broker delivers it
    again to the restarted agent: answered, once."""
    cloud = own_cloud
    agent = own_agent(record_accepted_after_s=30.0)
    warm(cloud, "marked")
    name = f"{how}-{uuid.uuid4().hex}"
    rid = send(cloud, "marked", {"name": name, "sleep": 3})
    wait_for((tmp_path / name).exists, 10, "the call never started")
    assert rid not in agent.accepted_on_record()
    if how == "kill9":
        agent.kill9()
    else:
        agent.signal(signal.SIGTERM)
        assert agent.wait_exit() == 0
    assert replies_to(cloud, rid) == []
    agent.start()
    reply = reply_to(cloud, rid, timeout=20)
    assert reply["ok"] is True and reply["result"]["runs"] == 2, reply
    assert_answered_once_after(cloud, agent, rid)


def test_a_long_call_goes_on_record_once_due_and_off_once_answered(
    tmp_path: Path, own_agent: OwnAgent, own_cloud: Cloud
) -> None:
    cloud = own_cloud
    agent = own_agent(record_accepted_after_s=0.3)
    warm(cloud, "marked")
    name = f"rec-{uuid.uuid4().hex}"
    rid = send(cloud, "marked", {"name": name, "sleep": 1.5})
    wait_for(lambda: rid in agent.accepted_on_record(), 10, "never put on record")
    assert replies_to(cloud, rid) == []
    reply = reply_to(cloud, rid)
    assert reply["ok"] is True and reply["result"]["runs"] == 1
    wait_for(lambda: rid not in agent.accepted_on_record(), 10, "the record stayed")


def rewrite_config(agent: AgentProcess, edit: Callable[[dict[str, Any]], None]) -> None:
    config = tomllib.loads(agent.config_path.read_text())
    edit(config)
    agent.config_path.write_text(tomli_w.dumps(config))


def test_recycling_every_call_with_concurrency_answers_every_call_once_and_leaks_nothing(
    tmp_path: Path, own_agent: OwnAgent, own_cloud: Cloud
) -> None:
    cloud = own_cloud
    agent = own_agent(start=False)
    rewrite_config(agent, lambda c: c["runtime"].update(worker_max_invocations=1))
    agent.start()
    cloud.wait_message(STATUS, lambda m: m["status"] == "online")
    cloud.deploy(NODE, source_spec("pid", PID, concurrency=3))
    wait_active(cloud, "pid")
    rids = [send(cloud, "pid", n) for n in range(15)]
    wait_for(lambda: all(replies_to(cloud, r) for r in rids), 60, "calls unanswered")
    errors = [replies_to(cloud, r)[0] for r in rids if not replies_to(cloud, r)[0]["ok"]]
    assert not errors, errors
    pids = [replies_to(cloud, r)[0]["result"] for r in rids]
    assert all(len(replies_to(cloud, r)) == 1 for r in rids)
    assert len(set(pids)) == 15, "a worker served twice with worker_max_invocations 1"
    wait_for(lambda: not set(pids) & workers_of(agent), 10, "recycled workers were not reaped")
    wait_for(lambda: len(workers_of(agent)) <= 4 + 1 + 1, 10, "more workers than allowed")


def test_sighup_lowering_max_workers_while_direct_calls_run(
    tmp_path: Path, own_agent: OwnAgent, own_cloud: Cloud
) -> None:
    cloud = own_cloud
    agent = own_agent()
    cloud.deploy(
        NODE,
        source_spec(
            "marked",
            marked(),
            version="2",
            concurrency=4,
            environment={MARK_ENV: str(tmp_path)},
        ),
    )
    wait_active(cloud, "marked", "2")
    names = [f"hup-{n}-{uuid.uuid4().hex}" for n in range(4)]
    rids = [send(cloud, "marked", {"name": name, "sleep": 1.0}) for name in names]
    wait_for(lambda: sum((tmp_path / n).exists() for n in names) >= 2, 10, "calls never started")
    rewrite_config(agent, lambda c: c["runtime"].update(max_workers=1))
    agent.signal(signal.SIGHUP)
    agent.wait_log(f"reloaded {agent.config_path}")
    more = [send(cloud, "marked", {"name": f"after-{n}", "sleep": 0}) for n in range(6)]
    wait_for(lambda: all(replies_to(cloud, r) for r in rids + more), 30, "unanswered")
    for rid in rids + more:
        [reply] = replies_to(cloud, rid)
        assert reply["ok"] is True, reply


def test_the_handler_gets_the_payload_only_not_the_request(cloud: Cloud) -> None:
    """One encoding: the worker is sent the whole request; the handler must see exactly its
    payload, whatever else the request carries (extra keys, a reply_to, a null payload)."""
    for payload in [None, 0, "", [], {"payload": "inner"}]:
        rid = send(cloud, "echo", payload, extra_key={"x": 1})
        reply = reply_to(cloud, rid)
        assert reply["ok"] is True and reply["result"] == {"echo": payload}, reply


def test_the_reply_is_valid_json_with_a_timestamp(cloud: Cloud) -> None:
    reply = cloud.invoke(NODE, "echo", 1)
    assert reply["ts"].endswith("Z") and len(reply["ts"]) == len("2026-01-01T00:00:00.000Z")
    assert json.loads(json.dumps(reply)) == reply


def test_a_reload_lowering_record_after_applies_to_new_calls_at_once(
    tmp_path: Path, own_agent: OwnAgent, own_cloud: Cloud
) -> None:
    """The reviewer's bug: the unrecorded calls were a FIFO of due times set at acceptance
    and the timer was only ever set once, so after a reload lowered the setting a new long
    call waited behind an older call's (later) due time. Now due times come from the
    running setting: both calls go on record soon after the reload."""
    cloud = own_cloud
    agent = own_agent(record_accepted_after_s=25.0)
    env = {MARK_ENV: str(tmp_path)}
    two = source_spec("marked", marked(), version="2", concurrency=2, environment=env)
    cloud.deploy(NODE, two)
    wait_active(cloud, "marked", "2")
    warm(cloud, "marked")
    first = f"a-{uuid.uuid4().hex}"
    first_rid = send(cloud, "marked", {"name": first, "sleep": 20})
    wait_for((tmp_path / first).exists, 10, "the first call never started")
    rewrite_config(agent, lambda c: c["agent"].update(record_accepted_after_s=0.2))
    agent.signal(signal.SIGHUP)
    agent.wait_log(f"reloaded {agent.config_path}")
    second = f"b-{uuid.uuid4().hex}"
    rid = send(cloud, "marked", {"name": second, "sleep": 10})
    wait_for((tmp_path / second).exists, 10, "the second call never started")
    wait_for(
        lambda: rid in agent.accepted_on_record(),
        3,
        "a call accepted after the reload was not put on record 0.2 s later",
    )
    assert first_rid in agent.accepted_on_record(), "the older call still waits"
