"""edgectl against a real broker, simulated nodes and a real agent: output and exit codes
(0 ok, 1 operation failed, 2 usage, 3 broker unreachable, 4 timeout)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cloud import ctl
from testing.agent_process import REPO, AgentProcess
from testing.broker import Mosquitto
from testing.fleet_sim import SimFleet, sim_fleet
from testing.ports import free_port
from testing.wait import wait_for

AgentFactory = Callable[..., AgentProcess]


class Ctl:
    """``edgectl --broker 127.0.0.1:<port> ARGS`` in this process; (exit code, stdout, stderr)."""

    def __init__(self, port: int, capsys: pytest.CaptureFixture[str]) -> None:
        self.port = port
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = ctl.main(["--broker", f"127.0.0.1:{self.port}", "--connect-timeout", "5", *args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> tuple[int, Any]:
        code, out, err = self(*args, "--json")
        try:
            return code, json.loads(out)
        except json.JSONDecodeError:
            pytest.fail(f"edgectl {' '.join(args)} printed no JSON (exit {code}): {out!r} {err!r}")


@pytest.fixture
def edgectl(broker: Mosquitto, capsys: pytest.CaptureFixture[str]) -> Ctl:
    return Ctl(broker.port, capsys)


@pytest.fixture
def sims(broker: Mosquitto) -> Iterator[SimFleet]:
    with sim_fleet(broker.port, 5, heartbeat_s=0.3) as fleet:
        yield fleet


@pytest.fixture
def echo_py(tmp_path: Path) -> str:
    path = tmp_path / "echo.py"
    path.write_text("def handler(event):\n    return event\n")
    return str(path)


def test_nodes_table_and_json(edgectl: Ctl, sims: SimFleet) -> None:
    code, out, _ = edgectl("nodes")
    assert code == 0
    assert "5 nodes under edge/" in out
    assert all(f"sim-000{i}" in out for i in range(5)) and "online" in out

    code, rows = edgectl.json("nodes", "--wait", "1")  # long enough for heartbeats at 0.3 s
    assert code == 0 and [r["id"] for r in rows] == [f"sim-000{i}" for i in range(5)]
    row = rows[0]
    assert row["status"] == "online" and row["cpu_percent"] is not None
    assert row["outbox"] == 0 and row["functions"] == []

    sims.kill("sim-0004")
    wait_for(
        lambda: edgectl.json("nodes", "--status", "offline")[1], 10, "sim-0004 never went offline"
    )


def test_flags_work_after_the_command_too(
    broker: Mosquitto, sims: SimFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    code = ctl.main(["nodes", "--json", "--broker", f"127.0.0.1:{broker.port}"])
    assert code == 0 and len(json.loads(capsys.readouterr().out)) == 5


def test_deploy_to_the_fleet_shows_progress_and_exits_0(
    edgectl: Ctl, sims: SimFleet, echo_py: str
) -> None:
    code, out, err = edgectl("deploy", echo_py, "--id", "echo", "--fleet", "--wait", "20")
    assert code == 0, err
    assert "deploying echo" in err and "5 nodes" in err
    assert "echo" in out and "active 5" in out

    code, report = edgectl.json("deploy", echo_py, "--id", "echo", "--fleet", "--version", "2")
    assert code == 0 and report["counts"]["active"] == 5 and report["version"] == "2"
    assert set(report["nodes"]) == {f"sim-000{i}" for i in range(5)}


def test_failed_deploy_exits_1_and_names_the_error(
    edgectl: Ctl, sims: SimFleet, echo_py: str
) -> None:
    code, out, err = edgectl(
        "deploy", echo_py, "--id", "echo", "--node", "sim-0001", "--env", "FLEET_SIM_FAIL=all"
    )
    assert code == 1
    assert "sim-0001" in err and "failed" in err and "simulated failure" in err
    assert "failed 1" in out


def test_canary_abort_exits_1_with_the_rollback(edgectl: Ctl, sims: SimFleet, echo_py: str) -> None:
    assert edgectl("deploy", echo_py, "--id", "echo", "--fleet", "--version", "1")[0] == 0
    code, result = edgectl.json(
        "deploy",
        echo_py,
        "--id",
        "echo",
        "--fleet",
        "--version",
        "2",
        "--canary",
        "40%",
        "--env",
        "FLEET_SIM_FAIL=all",
    )
    assert code == 1
    assert result["rolled_back"] is True and len(result["canaries"]) == 2
    assert result["rollback"]["version"] == "1"
    assert result["rollback"]["counts"]["active"] == 2


def test_canary_success_exits_0(edgectl: Ctl, sims: SimFleet, echo_py: str) -> None:
    code, out, err = edgectl("deploy", echo_py, "--id", "echo", "--fleet", "--canary", "1")
    assert code == 0, err
    assert "canaries: sim-" in out and "fleet: echo" in out and "active 5" in out


def test_deploy_that_cannot_finish_exits_4(edgectl: Ctl, sims: SimFleet, echo_py: str) -> None:
    """A node that never reports (unknown here) is not confirmed by the deadline: exit 4."""
    code, report = edgectl.json("deploy", echo_py, "--id", "echo", "--node", "ghost", "--wait", "1")
    assert code == 4 and report["nodes"]["ghost"]["state"] == "offline"


def test_undeploy(edgectl: Ctl, sims: SimFleet, echo_py: str) -> None:
    assert edgectl("deploy", echo_py, "--id", "echo", "--fleet")[0] == 0
    code, out, _ = edgectl("undeploy", "echo", "--fleet")
    assert code == 0 and "cleared the fleet spec of echo" in out
    wait_for(
        lambda: all(not node.deployed for node in sims.nodes.values()),
        10,
        "simulated nodes kept echo after undeploy",
    )
    code, _, err = edgectl("undeploy", "echo", "--fleet")
    assert code == 1 and "no fleet spec of echo" in err


def test_invoke_results_errors_and_missing_replies(
    edgectl: Ctl, sims: SimFleet, echo_py: str
) -> None:
    assert edgectl("deploy", echo_py, "--id", "echo", "--fleet")[0] == 0
    code, out, _ = edgectl("invoke", "sim-0002", "echo", "--payload", '{"t": 21.5}')
    assert code == 0 and json.loads(out)["echo"] == {"t": 21.5}

    code, reply = edgectl.json("invoke", "sim-0002", "echo", "--payload", "[1, 2]")
    assert code == 0 and reply["ok"] and reply["result"]["echo"] == [1, 2]

    code, _, err = edgectl(
        "invoke", "sim-0002", "echo", "--payload", '{"sim_error": "handler_error"}'
    )
    assert code == 1 and "handler_error: simulated handler_error in echo" in err

    code, _, err = edgectl("invoke", "sim-0002", "missing")
    assert code == 1 and "function_not_found" in err

    sims.kill("sim-0003")
    code, reply = edgectl.json("invoke", "sim-0003", "echo", "--timeout", "0.5")
    assert code == 4 and reply["error"]["type"] == "no_reply"

    code, _, err = edgectl("invoke", "sim-0002", "echo", "--payload", "{oops")
    assert code == 2 and "--payload: not JSON" in err


def test_unreachable_broker_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    code = ctl.main(["--broker", f"127.0.0.1:{port}", "--connect-timeout", "1", "nodes"])
    assert code == 3
    assert f"cannot reach the MQTT broker at 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["deploy", "x.py", "--id", "f"],  # neither --fleet nor --node
        ["invoke", "gw"],  # no function
        ["nodes", "--status", "sleepy"],
        ["--broker", "host:port:x", "nodes", "--connect-timeout", "abc"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ctl.main(argv)
    assert exc.value.code == 2


def test_usage_errors_found_after_parsing_exit_2(edgectl: Ctl, echo_py: str) -> None:
    code, _, err = edgectl("deploy", echo_py, "--id", "f", "--node", "gw", "--canary", "10%")
    assert code == 2 and "--canary needs --fleet" in err
    code, _, err = edgectl("deploy", echo_py, "--id", "f", "--fleet", "--memory-mb", "0")
    assert code == 2 and "memory_mb" in err
    code, _, err = edgectl("desired", "gw-1", "--set", "[1]")
    assert code == 2 and "expected a JSON object" in err
    assert ctl.main(["--broker", "a:b:c", "nodes"]) == 2


COUNTER = (
    "def handler(event, context):\n"
    "    n = context.state.get('count', 0) + event\n"
    "    context.state.set('count', n)\n"
    "    return {'count': n, 'desired': dict(context.desired)}\n"
)


def test_state_and_desired_with_a_real_agent(
    edgectl: Ctl, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """desired publishes the next version; the handler sees it; state asks for a snapshot."""
    agent_factory("gw-sync").start()
    wait_for(
        lambda: edgectl.json("nodes", "--status", "online")[1], 30, "gw-sync never came online"
    )
    (tmp_path / "counter.py").write_text(COUNTER)
    code, _, err = edgectl(
        "deploy", str(tmp_path / "counter.py"), "--id", "counter", "--node", "gw-sync"
    )
    assert code == 0, err

    code, out = edgectl.json("desired", "gw-sync", "--set", '{"mode": "eco"}')
    assert code == 0 and out["version"] == 1
    code, out = edgectl.json("desired", "gw-sync", "--set", '{"mode": "boost"}')
    assert code == 0 and out["version"] == 2  # the retained version 1 was seen first

    def counted() -> Any:
        code, reply = edgectl.json("invoke", "gw-sync", "counter", "--payload", "2")
        return reply["result"] if code == 0 and reply["result"]["desired"] else None

    result = wait_for(counted, 10, "the handler never saw the desired state")
    assert result["desired"] == {"mode": "boost"}

    code, state = edgectl.json("state", "gw-sync")
    assert code == 0, state
    assert state["data"]["count"] == result["count"] and state["desired_version"] == 2

    code, _, err = edgectl("state", "ghost", "--timeout", "0.5")
    assert code == 4 and "no snapshot from ghost" in err


def test_console_script_and_module_entry_points() -> None:
    """`edgectl` is installed by pyproject's [project.scripts]; `-m agent.cloud.ctl` works."""
    script = Path(sys.executable).with_name("edgectl")
    assert script.exists(), "edgectl console script missing: run `uv sync`"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "exit codes: 0 ok" in done.stdout
    for command in ("nodes", "deploy", "undeploy", "invoke", "state", "desired"):
        assert command in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "agent.cloud.ctl", "deploy", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0 and "--canary" in done.stdout and "EDGECTL_BROKER" in done.stdout
