"""``edge-agent`` as operators run it: a real subprocess, its exit codes and what it prints."""

from __future__ import annotations

import json
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w
from conftest import run_cli

from agent import __version__
from testing.agent_process import AgentProcess
from testing.cloud import Cloud
from testing.specs import source_spec

AgentFactory = Callable[..., AgentProcess]


def write_config(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    config: dict[str, Any] = {
        "node": {"id": "gw-cli"},
        "agent": {"state_dir": str(tmp_path / "state")},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = tmp_path / "agent.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def test_version_prints_the_package_version() -> None:
    """`edge-agent --version` prints the version the package reports and exits 0."""
    done = run_cli("--version")
    assert done.returncode == 0, done
    assert done.stdout.strip() == f"edge-agent {__version__}"


def test_help_lists_every_command() -> None:
    """`edge-agent --help` exits 0 and names run, check-config, config and status."""
    done = run_cli("--help")
    assert done.returncode == 0, done
    for command in ("run", "check-config", "config", "status"):
        assert command in done.stdout, done.stdout


def test_missing_command_is_a_usage_error() -> None:
    """No command at all is a usage error (exit 2), not a crash."""
    done = run_cli()
    assert done.returncode == 2, done
    assert "usage:" in done.stderr


def test_check_config_prints_the_effective_config(tmp_path: Path) -> None:
    """check-config exits 0 and prints TOML with the derived values filled in."""
    path = write_config(tmp_path)
    done = run_cli("check-config", "--config", str(path))
    assert done.returncode == 0, done
    assert done.stdout.startswith(f"# {path}: OK")
    effective = tomllib.loads(done.stdout)
    assert effective["node"]["name"] == "gw-cli"
    assert effective["mqtt"]["client_id"] == "edge-agent-gw-cli"
    assert effective["agent"]["state_dir"] == str(tmp_path / "state")
    assert effective["runtime"]["max_workers"] == 8


def test_check_config_unknown_key_exits_78_naming_it(tmp_path: Path) -> None:
    """A misspelt key is refused with exit 78, its dotted path and a suggestion."""
    path = write_config(tmp_path, mqtt={"keep_alive": 10})
    done = run_cli("check-config", "--config", str(path))
    assert done.returncode == 78, done
    assert "mqtt.keep_alive" in done.stderr
    assert "mqtt.keepalive" in done.stderr  # did you mean ...
    assert done.stdout == ""


def test_check_config_missing_file_exits_78(tmp_path: Path) -> None:
    """A config file that does not exist is a config error (78) naming the path."""
    missing = tmp_path / "nope.toml"
    done = run_cli("check-config", "--config", str(missing))
    assert done.returncode == 78, done
    assert str(missing) in done.stderr


def test_config_init_writes_an_accepted_file_and_refuses_to_overwrite(tmp_path: Path) -> None:
    """`config init PATH` writes a 0640 file check-config accepts, and never overwrites it."""
    path = tmp_path / "agent.toml"
    done = run_cli("config", "init", str(path), "--node-id", "gw-7")
    assert done.returncode == 0, done
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    checked = run_cli("check-config", "--config", str(path))
    assert checked.returncode == 0, checked
    assert tomllib.loads(checked.stdout)["node"]["id"] == "gw-7"

    written = path.read_text()
    again = run_cli("config", "init", str(path), "--node-id", "other")
    assert again.returncode == 1, again
    assert "exists" in again.stderr
    assert path.read_text() == written


def test_status_before_first_run_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    """status without a state database says so (exit 1) and creates nothing."""
    path = write_config(tmp_path)
    done = run_cli("status", "--config", str(path))
    assert done.returncode == 1, done
    assert "no state at" in done.stderr and "has the agent run yet" in done.stderr
    assert not (tmp_path / "state").exists()


BROKEN = "import no_such_module_anywhere\n\n\ndef handler(event):\n    return 2\n"


def test_status_after_a_run_lists_functions_outbox_and_last_connect(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """status reads the stopped agent's state: functions (with what still serves), outbox."""
    agent = agent_factory().start()
    cloud.wait_message("edge/nodes/gw-test/status", lambda m: m["status"] == "online")
    cloud.deploy(None, source_spec("good", "def handler(e):\n    return 1\n", version="1.0"))
    cloud.deploy(None, source_spec("flaky", "def handler(e):\n    return 1\n", version="1"))
    cloud.wait_message("edge/nodes/gw-test/functions/flaky/state", lambda m: m["state"] == "active")
    cloud.deploy(None, source_spec("flaky", BROKEN, version="2"))
    cloud.wait_message("edge/nodes/gw-test/functions/flaky/state", lambda m: m["state"] == "failed")
    cloud.wait_message("edge/nodes/gw-test/functions/good/state", lambda m: m["state"] == "active")
    agent.stop()

    done = run_cli("status", "--config", str(agent.config_path))
    assert done.returncode == 0, done
    text = done.stdout
    assert "node:         gw-test" in text
    assert "outbox:       0 messages" in text
    assert "last connect: never" not in text
    [flaky] = [line for line in text.splitlines() if line.strip().startswith("flaky")]
    assert flaky.split()[:3] == ["flaky", "2", "failed"], flaky
    assert "(serving 1)" in flaky and "no_such_module_anywhere" in flaky, flaky
    [good] = [line for line in text.splitlines() if line.strip().startswith("good")]
    assert good.split() == ["good", "1.0", "active"], good

    as_json = run_cli("status", "--json", "--config", str(agent.config_path))
    assert as_json.returncode == 0, as_json
    status = json.loads(as_json.stdout)
    assert status["node_id"] == "gw-test"
    assert status["outbox"] == {"messages": 0, "bytes": 0}
    by_id = {f["id"]: f for f in status["functions"]}
    assert by_id["flaky"]["state"] == "failed" and by_id["flaky"]["active_version"] == "1"
    assert by_id["flaky"]["error"]["type"] == "deployment_rejected"
    assert by_id["good"]["state"] == "active"


def test_status_on_a_corrupt_state_database_exits_1_naming_it(tmp_path: Path) -> None:
    """status on a state.db that is not a database fails cleanly (exit 1), no traceback."""
    path = write_config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.db").write_bytes(b"this is not an SQLite database" * 100)
    done = run_cli("status", "--config", str(path))
    assert done.returncode == 1, done
    assert "state.db" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
