"""The agent process's life: Last Will on abrupt death, graceful SIGTERM, SIGHUP reload,
bad config, heartbeats, and the systemd notify protocol, all against real processes."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w
from conftest import run_cli

from agent.contract import protocol
from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.ports import port_open
from testing.specs import source_spec
from testing.wait import wait_for

NODE = "gw-test"
STATUS = f"edge/nodes/{NODE}/status"
REPLIES = f"edge/nodes/{NODE}/replies"
HEARTBEAT = f"edge/nodes/{NODE}/heartbeat"
KEEPALIVE = 5  # conftest's AgentProcess default

AgentFactory = Callable[..., AgentProcess]

ECHO = "def handler(event):\n    return {'echo': event}\n"
SLOWPOKE = """\
import os
import time


def handler(event):
    open(os.path.join(os.environ['RUNS_DIR'], event['name']), 'w').close()
    time.sleep(event['sleep'])
    return {'done': event['name']}
"""


def online(cloud: Cloud, agent_factory: AgentFactory, **sections: Any) -> AgentProcess:
    agent = agent_factory(**sections).start()
    cloud.wait_message(STATUS, lambda m: m["status"] == "online")
    return agent


def deploy_active(cloud: Cloud, spec: dict[str, Any]) -> None:
    cloud.deploy(None, spec)
    cloud.wait_message(
        f"edge/nodes/{NODE}/functions/{spec['id']}/state", lambda m: m["state"] == "active"
    )


def index_of(cloud: Cloud, topic: str, predicate: Callable[[dict[str, Any]], bool]) -> int:
    for i, (t, payload, _) in enumerate(list(cloud.messages)):
        if t == topic and payload and predicate(json.loads(payload)):
            return i
    raise AssertionError(f"no matching message on {topic}")


def test_last_will_marks_node_offline_when_agent_is_killed(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """kill -9: the broker publishes the retained Will, status offline, within 1.5 keepalives."""
    agent = online(cloud, agent_factory)
    agent.kill9()
    will = cloud.wait_message(STATUS, lambda m: m["status"] == "offline", timeout=KEEPALIVE * 1.5)
    assert will["reason"] == "connection lost", will
    assert will["node_id"] == NODE
    protocol.decode_status(json.dumps(will).encode())
    with_late_subscriber = Cloud(cloud.port)  # retained: a controller connecting later sees it
    try:
        late = with_late_subscriber.wait_message(STATUS)
        assert late["status"] == "offline", late
    finally:
        with_late_subscriber.close()


def test_sigterm_finishes_inflight_invocation_then_goes_offline_and_exits_0(
    cloud: Cloud, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """SIGTERM: the running invocation is answered, then `offline` is published, exit 0, no
    worker left behind."""
    agent = online(cloud, agent_factory)
    deploy_active(cloud, source_spec("slowpoke", SLOWPOKE, environment={"RUNS_DIR": str(tmp_path)}))
    rid = f"term-{uuid.uuid4().hex}"
    cloud.publish(
        f"edge/nodes/{NODE}/invoke",
        {"request_id": rid, "function_id": "slowpoke", "payload": {"name": rid, "sleep": 1.0}},
    )
    wait_for((tmp_path / rid).exists, 10, "the invocation never started")
    assert agent.proc is not None
    workers = psutil.Process(agent.proc.pid).children(recursive=True)
    assert workers, "expected at least the busy worker under the agent"

    agent.signal(signal.SIGTERM)
    reply = cloud.wait_message(REPLIES, lambda m: m["request_id"] == rid)
    assert reply["ok"] is True and reply["result"] == {"done": rid}, reply
    own_offline = cloud.wait_message(STATUS, lambda m: m["status"] == "offline")
    assert "reason" not in own_offline, f"that is the broker's Will, not the agent: {own_offline}"
    assert index_of(cloud, REPLIES, lambda m: m["request_id"] == rid) < index_of(
        cloud, STATUS, lambda m: m["status"] == "offline"
    ), "offline was published before the in-flight reply"
    assert agent.wait_exit() == 0
    wait_for(
        lambda: not [w.pid for w in workers if psutil.pid_exists(w.pid)],
        5,
        f"workers outlived the agent: {[w.pid for w in workers if psutil.pid_exists(w.pid)]}",
    )


def _rewrite_config(agent: AgentProcess, edit: Callable[[dict[str, Any]], None]) -> None:
    config = tomllib.loads(agent.config_path.read_text())
    edit(config)
    agent.config_path.write_text(tomli_w.dumps(config))


def test_sighup_reloads_config_and_refuses_a_bad_one_without_stopping(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """SIGHUP re-reads the file; a broken file is refused and the agent keeps running."""
    agent = online(cloud, agent_factory)
    deploy_active(cloud, source_spec("echo", ECHO))
    _rewrite_config(agent, lambda c: c["agent"].update(heartbeat_interval_s=2.0))
    agent.signal(signal.SIGHUP)
    agent.wait_log(f"reloaded {agent.config_path}")

    _rewrite_config(agent, lambda c: c["mqtt"].update(keepalive="ten"))
    agent.signal(signal.SIGHUP)
    agent.wait_log("reload refused")
    assert "mqtt.keepalive" in agent.log().split("reload refused", 1)[1]
    assert agent.proc is not None and agent.proc.poll() is None, "a bad reload stopped the agent"
    assert cloud.invoke(NODE, "echo", "after reload")["ok"] is True


BAD_CONFIGS = [
    pytest.param({"mqtt": {"keepalive": "ten"}}, "mqtt.keepalive", id="bad-value"),
    pytest.param({"agent": {"heartbeat": 3}}, "agent.heartbeat", id="unknown-key"),
    pytest.param({"runtime": {"prestart": 99}}, "runtime.prestart", id="out-of-range"),
]


@pytest.mark.parametrize(("bad", "key"), BAD_CONFIGS)
def test_bad_config_exits_78_with_one_line_naming_the_key(
    tmp_path: Path, bad: dict[str, Any], key: str
) -> None:
    """`edge-agent run` on a bad config exits 78 (EX_CONFIG) with one line naming the key."""
    config: dict[str, Any] = {"node": {"id": "gw-bad"}, "agent": {"state_dir": str(tmp_path)}}
    for section, values in bad.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "agent.toml"
    path.write_text(tomli_w.dumps(config))
    done = run_cli("run", "--config", str(path))
    assert done.returncode == 78, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert key in lines[0], lines[0]
    assert not (tmp_path / "state.db").exists(), "a refused config must not touch the state"


def test_heartbeat_carries_system_metrics_function_counters_and_outbox(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """Heartbeats validate against the contract and count this function's invocations."""
    online(cloud, agent_factory)
    deploy_active(cloud, source_spec("echo", ECHO, version="9"))
    for n in range(3):
        assert cloud.invoke(NODE, "echo", n)["ok"] is True

    def counted(m: dict[str, Any]) -> bool:
        return any(f["id"] == "echo" and f["invocations"] >= 3 for f in m["functions"])

    beat = cloud.wait_message(HEARTBEAT, counted, timeout=5)
    protocol.decode_heartbeat(json.dumps(beat).encode())
    assert beat["node_id"] == NODE and beat["status"] == "online"
    assert beat["system"]["memory_total_mb"] > 0
    assert beat["system"]["disk_free_mb"] > 0
    [echo] = [f for f in beat["functions"] if f["id"] == "echo"]
    assert echo["version"] == "9" and echo["state"] == "active"
    assert echo["errors"] == 0 and echo["timeouts"] == 0
    assert echo["p95_ms"] >= echo["p50_ms"] > 0
    assert beat["outbox"]["messages"] >= 0 and beat["outbox"]["bytes"] >= 0
    seqs = [m["seq"] for m in cloud.on(HEARTBEAT)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs


class NotifySocket:
    """An AF_UNIX datagram socket playing systemd's $NOTIFY_SOCKET; records every line."""

    def __init__(self, path: Path) -> None:
        assert len(str(path)) < 100, f"socket path too long for AF_UNIX: {path}"
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            self.lines.extend((now, line) for line in data.decode().splitlines())

    def first(self, prefix: str) -> float | None:
        return next((t for t, line in list(self.lines) if line.startswith(prefix)), None)

    def count(self, line: str) -> int:
        return sum(1 for _, got in list(self.lines) if got == line)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_systemd_ready_before_broker_then_status_watchdog_and_stopping(
    broker: Mosquitto,
    agent_factory: AgentFactory,
    notify_socket: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """READY=1 comes with the broker down; STATUS and WATCHDOG=1 follow; SIGTERM says STOPPING=1."""
    monkeypatch.delenv("WATCHDOG_PID", raising=False)  # the watchdog is the agent's own
    broker.stop()
    agent = agent_factory().start(
        env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"}
    )
    wait_for(lambda: notify_socket.first("READY=1"), 10, "no READY=1 while the broker is down")
    assert not port_open(broker.port)
    wait_for(
        lambda: notify_socket.first("STATUS=disconnected"), 5, "no STATUS= saying disconnected"
    )
    wait_for(lambda: notify_socket.count("WATCHDOG=1") >= 3, 5, "WATCHDOG=1 did not keep coming")

    broker.start()
    wait_for(
        lambda: notify_socket.first("STATUS=connected"), 10, "no STATUS= after the broker came up"
    )
    agent.signal(signal.SIGHUP)
    wait_for(lambda: notify_socket.first("RELOADING=1"), 10, "no RELOADING=1 on SIGHUP")
    wait_for(lambda: notify_socket.count("READY=1") == 2, 10, "no READY=1 after the reload")
    agent.signal(signal.SIGTERM)
    wait_for(lambda: notify_socket.first("STOPPING=1"), 10, "no STOPPING=1 after SIGTERM")
    assert agent.wait_exit() == 0
    ready = notify_socket.first("READY=1")
    stopping = notify_socket.first("STOPPING=1")
    assert ready is not None and stopping is not None and ready < stopping


WHOAMI = "import os\n\n\ndef handler(event):\n    return os.getuid()\n"


def test_sighup_changing_worker_user_is_applied_or_reported(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """A reload that changes runtime.worker_user either applies it or says it needs a restart."""
    if os.geteuid() != 0:
        pytest.skip("switching worker users needs root")
    nobody = pwd.getpwnam("nobody").pw_uid
    agent = online(cloud, agent_factory)
    _rewrite_config(agent, lambda c: c["runtime"].update(worker_user="nobody"))
    agent.signal(signal.SIGHUP)
    agent.wait_log("reloaded")
    deploy_active(cloud, source_spec("whoami", WHOAMI))
    uid = cloud.invoke(NODE, "whoami", None)["result"]
    reported = "runtime.worker_user" in agent.log().split("reloaded", 1)[1]
    assert uid == nobody or reported, (
        f"workers still run as uid {uid} and the reload did not say runtime.worker_user "
        "needs a restart"
    )


def test_unusable_state_database_exits_1_with_a_critical_line(tmp_path: Path) -> None:
    """`edge-agent run` on a state.db it cannot open exits 1 and says why, without a traceback
    (a corrupt one is repaired instead: tests/test_faults_store.py)."""
    state = tmp_path / "state"
    (state / "state.db").mkdir(parents=True)  # a directory: nothing to repair
    config = {"node": {"id": "gw-corrupt"}, "agent": {"state_dir": str(state)}}
    path = tmp_path / "agent.toml"
    path.write_text(tomli_w.dumps(config))
    done = run_cli("run", "--config", str(path))
    assert done.returncode == 1, done
    assert "local state unusable" in done.stderr and "state.db" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
