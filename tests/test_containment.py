"""Containment: a function's whole process tree stays inside its time and memory, and cannot
flood the agent. Real handlers, real workers, real limits against a live agent.

The attacks these pin: a grandchild started with setsid() and a double fork outlived the
timeout, the undeploy and the agent itself; forks were unbounded; a worker wrote a 200 MB
frame to the agent (agent peak 633 MB; three at once 815 MB); after ``kill -9`` of the agent
the orphaned worker finished its handler and the redelivered invoke ran the side effect twice.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import needs_isolation

from testing.agent_process import AgentProcess
from testing.cloud import Cloud
from testing.specs import source_spec
from testing.wait import wait_for

NODE = "gw-test"
BASE = f"edge/nodes/{NODE}"

#: Starts an escapee (double fork + setsid) that beats a heartbeat file, then does ``then``.
ESCAPE = """\
import os
import time


def escape(path):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open(path + ".pid", "w") as f:
                f.write(str(os.getpid()))
            while True:
                with open(path, "a") as f:
                    f.write(".")
                time.sleep(0.05)
        os._exit(0)


def handler(event):
    escape(event["escapee"])
    while not os.path.exists(event["escapee"] + ".pid"):
        time.sleep(0.005)
    if event.get("started"):
        with open(event["started"], "a") as f:
            f.write("started\\n")
    if event.get("sleep"):
        time.sleep(event["sleep"])
    if event.get("finished"):
        with open(event["finished"], "a") as f:
            f.write("finished\\n")
    return int(open(event["escapee"] + ".pid").read())
"""

FORKS = """\
import os
import time


def handler(event):
    children = []
    try:
        for _ in range(event["n"]):
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
    except OSError as exc:
        refused = exc.errno
    else:
        refused = None
    for pid in children:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return {"forked": len(children), "refused": refused}
"""

BIG_FRAME = """\
import os
import struct
import sys


def handler(event):
    if event["mb"] <= 0:
        return "warm"
    size = event["mb"] << 20
    fd = int(sys.argv[3])  # the reply pipe: the bootstrap's argv is root, rfd, wfd, ...
    os.write(fd, struct.pack("!II", 2, size) + b"{}")
    chunk = b"x" * (1 << 20)
    for _ in range(event["mb"]):
        os.write(fd, chunk)  # the agent kills us long before this ends
    return "unreachable"
"""


def deploy(cloud: Cloud, fid: str, source: str, **over: Any) -> None:
    cloud.deploy(None, source_spec(fid, source, **over))
    state = cloud.wait_message(f"{BASE}/functions/{fid}/state", lambda m: m["state"] != "")
    assert state["state"] == "active", state


def markers(open_dir: Path) -> Path:
    """A directory function users may write to (their markers; the test reads them)."""
    path = open_dir / f"markers-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    path.chmod(0o777)
    return path


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, within: float, what: str) -> None:
    wait_for(lambda: not alive(pid), within, f"{what} (pid {pid}) is still running")


def read_pid(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text(), 10, f"no {path}"))


@needs_isolation
def test_timeout_kills_setsid_double_fork_escapees(
    cloud: Cloud, isolated_agents: Callable[..., AgentProcess], open_dir: Path
) -> None:
    """A grandchild that left the worker's process group kept running after the timeout."""
    isolated_agents()
    deploy(cloud, "esc", ESCAPE, timeout_seconds=1)
    escapee = markers(open_dir) / "beat"
    reply = cloud.invoke(NODE, "esc", {"escapee": str(escapee), "sleep": 30})
    assert reply["ok"] is False and reply["error"]["type"] == "timeout", reply
    wait_gone(read_pid(Path(f"{escapee}.pid")), 1.0, "the escapee outlived the timeout")


@needs_isolation
def test_undeploy_kills_what_the_function_left_running(
    cloud: Cloud, isolated_agents: Callable[..., AgentProcess], open_dir: Path
) -> None:
    """A handler that returned but left an escapee behind: the escapee outlived the undeploy."""
    isolated_agents()
    deploy(cloud, "esc", ESCAPE)
    escapee = markers(open_dir) / "beat"
    pid = cloud.invoke(NODE, "esc", {"escapee": str(escapee)})["result"]
    assert alive(pid)
    cloud.publish("edge/fleet/functions/esc", b"", retain=True)
    cloud.wait_message(f"{BASE}/functions/esc/state", lambda m: m["state"] == "removed")
    wait_gone(pid, 1.0, "the escapee outlived the undeploy")


@needs_isolation
def test_agent_kill9_takes_its_workers_and_a_restart_sweeps_escapees(
    cloud: Cloud, isolated_agents: Callable[..., AgentProcess], open_dir: Path
) -> None:
    """After kill -9 of the agent the orphaned worker finished its handler, and the broker's
    redelivery ran the side effect a second time; escapees lived on for good."""
    agent = isolated_agents()
    deploy(cloud, "esc", ESCAPE, timeout_seconds=30)
    where = markers(open_dir)
    event = {
        "escapee": str(where / "beat"),
        "started": str(where / "started"),
        "finished": str(where / "finished"),
        "sleep": 3,
    }
    rid = uuid.uuid4().hex
    cloud.publish(f"{BASE}/invoke", {"request_id": rid, "function_id": "esc", "payload": event})
    wait_for((where / "started").exists, 10, "the handler never started")
    assert agent.proc is not None
    workers = [
        p
        for p in psutil.Process(agent.proc.pid).children()
        if "agent.exec.worker" in " ".join(p.cmdline())
    ]
    assert workers
    escapee = read_pid(where / "beat.pid")
    os.kill(agent.proc.pid, signal.SIGKILL)  # the agent alone, not its children
    agent.proc.wait(10)
    for worker in workers:
        wait_gone(worker.pid, 1.0, "a worker outlived the agent")
    agent.start()
    agent.wait_log("killed", timeout=15)  # the boot sweep
    wait_gone(escapee, 1.0, "the escapee outlived the restart")
    reply = cloud.wait_message(f"{BASE}/replies", lambda m: m["request_id"] == rid, timeout=20)
    assert reply["ok"] is True, reply
    # ran twice (before the kill, then redelivered), its side effect once
    assert (where / "started").read_text().count("started") == 2
    assert (where / "finished").read_text().count("finished") == 1


@needs_isolation
def test_max_processes_bounds_forks(
    cloud: Cloud, isolated_agents: Callable[..., AgentProcess]
) -> None:
    """Forks were unbounded: RLIMIT_NPROC on the function's own uid stops them."""
    isolated_agents()
    deploy(cloud, "forks", FORKS, max_processes=8)
    result = cloud.invoke(NODE, "forks", {"n": 50})["result"]
    assert result["forked"] < 8 and result["refused"] == 11, result  # EAGAIN


def test_spec_asking_for_more_processes_than_the_node_allows_is_rejected(
    cloud: Cloud, agent_factory: Callable[..., AgentProcess]
) -> None:
    agent_factory(runtime={"max_processes": 16}).start()
    cloud.deploy(None, source_spec("forks", FORKS, max_processes=17))
    state = cloud.wait_message(f"{BASE}/functions/forks/state", lambda m: m["state"] != "")
    assert state["state"] == "rejected" and "max_processes 17" in state["error"]["message"]


def vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_huge_frames_from_workers_cost_the_agent_no_memory(
    cloud: Cloud, agent_factory: Callable[..., AgentProcess]
) -> None:
    """Three workers writing 200 MB frames at once took the agent to 815 MB peak RSS."""
    agent = agent_factory(runtime={"max_workers": 4}).start()
    deploy(cloud, "big", BIG_FRAME, concurrency=3)
    cloud.invoke(NODE, "big", {"mb": -1})  # warm: the agent's own peak settles first
    assert agent.proc is not None
    before = vm_hwm_kb(agent.proc.pid)
    replies: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda: replies.append(cloud.invoke(NODE, "big", {"mb": 200})))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(replies) == 3
    for reply in replies:
        assert reply["ok"] is False and reply["error"]["type"] == "handler_error", reply
        assert "over the limit" in reply["error"]["message"]
    grown_mb = (vm_hwm_kb(agent.proc.pid) - before) / 1024
    assert grown_mb < 20, f"the agent's peak RSS grew by {grown_mb:.1f} MB"


def test_a_result_over_the_reply_limit_is_refused_by_the_worker(
    cloud: Cloud, agent_factory: Callable[..., AgentProcess]
) -> None:
    """The worker refuses a result the agent could not reply with, before sending it."""
    agent_factory(agent={"max_payload_bytes": 64 * 1024}).start()
    deploy(cloud, "chatty", "def handler(event):\n    return 'x' * event\n")
    reply = cloud.invoke(NODE, "chatty", 1 << 20)
    assert reply["ok"] is False and reply["error"]["type"] == "handler_error", reply
    assert "over the limit" in reply["error"]["message"]
    assert cloud.invoke(NODE, "chatty", 10)["result"] == "x" * 10


# -- memory of the whole tree (the sampler) ---------------------------------------------------

HOGS = """\
import mmap
import os
import time


def handler(event):
    if event["how"] == "children":  # each child alone is within RLIMIT_DATA
        for _ in range(event["n"]):
            if os.fork() == 0:
                hog = bytearray(event["mb"] << 20)
                time.sleep(30)
                os._exit(0)
    elif event["how"] == "shared":  # RLIMIT_DATA does not count shared mappings
        hog = mmap.mmap(-1, event["mb"] << 20, flags=mmap.MAP_SHARED)
        for offset in range(0, len(hog), 4096):
            hog[offset] = 1
    elif event["how"] == "escapee":  # its own session, outside the worker's group
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:  # shared: RLIMIT_DATA would stop a private 200 MB
                with open(event["pidfile"], "w") as f:
                    f.write(str(os.getpid()))
                hog = mmap.mmap(-1, event["mb"] << 20, flags=mmap.MAP_SHARED)
                for offset in range(0, len(hog), 4096):
                    hog[offset] = 1
                time.sleep(30)
            os._exit(0)
        return "left it"
    time.sleep(20)
    return "survived"
"""


@needs_isolation
@pytest.mark.parametrize(
    ("how", "n", "mb"),
    [("children", 4, 60), ("shared", 1, 400)],
    ids=["four-children-of-60MB", "shared-mmap-of-400MB"],
)
def test_tree_over_memory_mb_is_killed_as_memory_exceeded(
    cloud: Cloud, isolated_agents: Callable[..., AgentProcess], how: str, n: int, mb: int
) -> None:
    """Four forked children of 60 MB (308 MB in all) and a 400 MB shared mmap ran under
    memory_mb 64: RLIMIT_DATA bounds each process's private memory only."""
    isolated_agents()
    deploy(cloud, "hog", HOGS, memory_mb=64, timeout_seconds=30)
    state = cloud.wait_message(f"{BASE}/functions/hog/state", lambda m: m["state"] == "active")
    assert state["limits"] == "rlimit+sampled", state
    reply = cloud.invoke(NODE, "hog", {"how": how, "n": n, "mb": mb}, timeout=15)
    assert reply["ok"] is False and reply["error"]["type"] == "memory_exceeded", reply
    assert "processes together" in reply["error"]["message"]
    assert reply["duration_ms"] < 5000, "the sampler took seconds to act"
    assert cloud.invoke(NODE, "hog", {"how": "children", "n": 0, "mb": 0}, timeout=30)["ok"]


@needs_isolation
def test_escapee_over_memory_mb_is_killed(
    cloud: Cloud, isolated_agents: Callable[..., AgentProcess], open_dir: Path
) -> None:
    """A setsid grandchild holding 200 MB outside any worker counted against nothing."""
    isolated_agents()
    deploy(cloud, "hog", HOGS, memory_mb=64, timeout_seconds=30)
    pidfile = markers(open_dir) / "hog.pid"
    reply = cloud.invoke(NODE, "hog", {"how": "escapee", "mb": 200, "pidfile": str(pidfile)})
    assert reply["result"] == "left it"
    wait_gone(read_pid(pidfile), 3.0, "the 200 MB escapee")


def test_shared_uid_functions_report_rlimit_only(
    cloud: Cloud, agent_factory: Callable[..., AgentProcess]
) -> None:
    """Where the tree cannot be sampled (no uid of its own), the state says so."""
    agent_factory().start()
    deploy(cloud, "hog", HOGS)
    state = cloud.wait_message(f"{BASE}/functions/hog/state", lambda m: m["state"] == "active")
    assert state["limits"] == "rlimit", state
    heartbeat = cloud.wait_message(f"{BASE}/heartbeat", lambda m: bool(m["functions"]))
    assert heartbeat["functions"][0]["limits"] == "rlimit", heartbeat
