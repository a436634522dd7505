"""A function reaches only its own: a uid per function, for real (the tests run as root).

The attacks these pin, each run by a real handler in a real worker against a live agent:
a function read ``agent.toml`` and ``state.db`` (other callers' replies, the outbox), read
another function's code and its ``API_KEY`` from ``/proc/<pid>/environ``, rewrote its own
installed code, and killed the agent with ``kill(getppid(), SIGKILL)``, because every worker
shared the agent's uid. Now each function's workers take a uid and gid of their own from
``runtime.function_uids`` and drop every capability before its code loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import FUNCTION_UIDS, WORKER_PYTHON, needs_isolation

from agent.edge.isolation import FunctionIdentities
from agent.errors import DeploymentRejected
from agent.store import Store
from testing.agent_process import AgentProcess
from testing.cloud import Cloud
from testing.specs import source_spec

NODE = "gw-test"
BASE = f"edge/nodes/{NODE}"
UIDS = FUNCTION_UIDS

pytestmark = needs_isolation

SPY = """\
import os
import signal
import sqlite3


def attempt(action):
    try:
        action()
    except (PermissionError, sqlite3.OperationalError):
        return "denied"
    except OSError as exc:
        return "error " + str(exc.errno)
    return "allowed"


def read(path):
    with open(path, "rb") as f:
        f.read(1)


def outbox(path):
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO outbox (topic, payload, qos, retain, kind, created_ts)"
                 " VALUES ('edge/fleet/functions/worm', x'00', 1, 1, 'state', 0)")
    conn.commit()


def handler(event):
    out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
    for name, path in event["read"].items():
        out["read " + name] = attempt(lambda path=path: read(path))
    out["write own code"] = attempt(lambda: open(event["own_code"], "a").close())
    out["write outbox"] = attempt(lambda: outbox(event["state_db"]))
    out["signal agent"] = attempt(lambda: os.kill(event["agent_pid"], 0))
    out["kill parent"] = attempt(lambda: os.kill(os.getppid(), signal.SIGKILL))
    out["setuid 0"] = attempt(lambda: os.setuid(0))
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapPrm", "CapEff", "CapAmb", "NoNewPrivs"):
                status[key] = value.strip()
    out["status"] = status
    return out
"""

VICTIM = """\
import os


def handler(event):
    return {"pid": os.getpid(), "uid": os.getuid(), "key": os.environ.get("API_KEY")}
"""


def deploy(cloud: Cloud, fid: str, source: str, **over: Any) -> None:
    cloud.deploy(None, source_spec(fid, source, **over))
    state = cloud.wait_message(
        f"{BASE}/functions/{fid}/state", lambda m: m["state"] in ("active", "failed", "rejected")
    )
    assert state["state"] == "active", state


def code_file(agent: AgentProcess, fid: str) -> Path:
    with Store(agent.state_dir / "state.db") as store:
        row = store.get_deployment(fid)
    assert row is not None and row.active_code_dir
    return next(Path(row.active_code_dir).glob("*.py"))


def test_function_cannot_read_agent_files_other_code_environ_nor_signal_the_agent(
    cloud: Cloud, isolated_agents: Callable[..., AgentProcess]
) -> None:
    """One function read the config, state.db, another's code and API_KEY, wrote the outbox
    (a worm), rewrote its own code and killed the agent: all from the agent's uid."""
    agent = isolated_agents()
    status = cloud.wait_message(f"{BASE}/status", lambda m: m["status"] == "online")
    assert status["isolation"] == "uid", status
    deploy(cloud, "victim", VICTIM, environment={"API_KEY": "s3cret"})
    deploy(cloud, "spy", SPY)
    victim = cloud.invoke(NODE, "victim", {})["result"]
    assert victim["key"] == "s3cret"
    assert agent.proc is not None
    event = {
        "read": {
            "agent.toml": str(agent.config_path),
            "state.db": str(agent.state_dir / "state.db"),
            "other function's code": str(code_file(agent, "victim")),
            "agent environ": f"/proc/{agent.proc.pid}/environ",
            "other function's environ": f"/proc/{victim['pid']}/environ",
        },
        "own_code": str(code_file(agent, "spy")),
        "state_db": str(agent.state_dir / "state.db"),
        "agent_pid": agent.proc.pid,
    }
    reply = cloud.invoke(NODE, "spy", event)
    assert reply["ok"] is True, reply
    spy = reply["result"]
    attacks = {k: v for k, v in spy.items() if k not in ("uid", "gid", "groups", "status")}
    assert attacks == dict.fromkeys(attacks, "denied"), attacks
    low, high = (int(x) for x in UIDS.split("-"))
    assert low <= spy["uid"] <= high and spy["gid"] == spy["uid"] and spy["groups"] == []
    assert low <= victim["uid"] <= high and victim["uid"] != spy["uid"]
    assert spy["status"] == {
        "CapPrm": "0000000000000000",
        "CapEff": "0000000000000000",
        "CapAmb": "0000000000000000",
        "NoNewPrivs": "1",
    }
    assert agent.proc.poll() is None, "the agent died"
    assert cloud.invoke(NODE, "victim", {})["result"]["key"] == "s3cret"
    with Store(agent.state_dir / "state.db") as store:
        assert not [i for i in store.outbox_peek(1000) if "worm" in i.topic]


def test_function_keeps_its_uid_and_its_code_its_group_across_restarts(
    cloud: Cloud, isolated_agents: Callable[..., AgentProcess]
) -> None:
    """Restored code must stay readable by its function, and by no other."""
    agent = isolated_agents()
    cloud.wait_message(f"{BASE}/status", lambda m: m["status"] == "online")
    deploy(cloud, "victim", VICTIM)
    first = cloud.invoke(NODE, "victim", {})["result"]["uid"]
    code = code_file(agent, "victim")
    assert code.stat().st_gid == first and code.stat().st_mode & 0o777 == 0o640
    assert code.parent.stat().st_mode & 0o777 == 0o750
    agent.stop()
    agent.start()
    agent.wait_log("restored 1 deployed functions")
    again = cloud.invoke(NODE, "victim", {}, timeout=15)
    assert again["ok"] is True and again["result"]["uid"] == first, again


def test_without_a_reachable_interpreter_functions_share_a_uid_and_status_says_so(
    cloud: Cloud, isolated_agents: Callable[..., AgentProcess]
) -> None:
    """Isolation that cannot work is said, loudly, and everything else still works."""
    agent = isolated_agents(worker_python="")  # this venv's python: under /root, 0700
    status = cloud.wait_message(f"{BASE}/status", lambda m: m["status"] == "online")
    assert status["isolation"] == "shared-uid", status
    assert "isolation: shared-uid" in agent.log()
    deploy(cloud, "victim", VICTIM)
    assert cloud.invoke(NODE, "victim", {})["result"]["uid"] == 0


def test_uid_allocation_skips_existing_accounts_and_rejects_when_the_range_is_used_up(
    open_dir: Path,
) -> None:
    nobody = 65534  # Debian's nobody: never handed to a function
    with Store(open_dir / "state" / "state.db") as store:
        ids = FunctionIdentities(store, f"{nobody - 1}-{nobody + 1}", open_dir / "state" / "f")
        assert ids.start(WORKER_PYTHON).mode == "uid"
        assert ids.identity("a") == (nobody - 1, nobody - 1)
        assert ids.identity("b") == (nobody + 1, nobody + 1)
        assert ids.identity("a") == (nobody - 1, nobody - 1)  # kept
        with pytest.raises(DeploymentRejected, match="no free uid"):
            ids.identity("c")
        again = FunctionIdentities(store, f"{nobody - 1}-{nobody + 1}", open_dir / "state" / "f")
        again.start(WORKER_PYTHON)
        assert again.identity("b") == (nobody + 1, nobody + 1)  # persisted in the store
        assert json.loads(json.dumps(store.meta_items("uid."))) == {
            "uid.a": str(nobody - 1),
            "uid.b": str(nobody + 1),
        }
