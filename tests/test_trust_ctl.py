"""Signing from the operator's side and key handling on the agent's: ``edgectl keygen``,
``edgectl deploy --sign-key``, ``EdgeCluster.connect(sign_key=...)`` staged rollouts and
rollbacks against real agents, key files the agent refuses (exit 78), and entrypoints that
would load something other than the bundle."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from fleetutil import versioned_module
from paho.mqtt.enums import CallbackAPIVersion

from agent.cloud import ctl, function_spec
from agent.contract import protocol
from agent.errors import DeploymentRejected
from agent.exec import bundles
from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import connect
from testing.wait import wait_for

AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A key pair made by ``edgectl keygen`` in a directory only root can write."""
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o755)
    path = directory / "ops"
    assert ctl.main(["keygen", str(path)]) == 0
    capsys.readouterr()
    return path


class SpecRecorder:
    """Every retained spec published under ``edge/`` (fleet and node topics), in order."""

    def __init__(self, port: int) -> None:
        self.specs: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([("edge/fleet/functions/+", 1), ("edge/nodes/+/functions/+", 1)])
        assert subscribed.wait(5), "the spec recorder could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.specs.append((msg.topic, bytes(msg.payload)))

    def published(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return [(t, json.loads(p)) for t, p in self.specs if p]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_keygen_writes_a_0600_private_key_and_a_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """keygen: PATH is the private key (PEM, 0600), PATH.pub the public one; never overwrites."""
    path = tmp_path / "ops"
    assert ctl.main(["keygen", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["key_id"]) == 16
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert Path(f"{path}.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert ctl.main(["keygen", str(path)]) == ctl.EXIT_USAGE
    assert "exists" in capsys.readouterr().err


def test_sign_key_that_others_can_read_is_refused(
    key: Path, broker: Mosquitto, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A private signing key readable by others is refused, as OpenSSH refuses one."""
    key.chmod(0o644)
    module = versioned_module(tmp_path / "code", "1")
    argv = [f"--broker=127.0.0.1:{broker.port}", "deploy", str(module), "--id=f", "--fleet"]
    code = ctl.main([*argv, f"--sign-key={key}"])
    assert code == ctl.EXIT_USAGE
    assert "readable by others" in capsys.readouterr().err


def test_edgectl_deploy_signs_and_an_unsigned_deploy_is_rejected(
    key: Path,
    broker: Mosquitto,
    agent_factory: AgentFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """edgectl deploy --sign-key reaches active; the same deploy without a key exits 1."""
    agent_factory("gw-1", trust={"keys": [f"{key}.pub"]}).start()
    base = ["--broker", f"127.0.0.1:{broker.port}", "--heartbeat-interval", "1"]
    with connect(broker.port) as cluster:
        wait_for(lambda: cluster.get_node("gw-1"), 15, "gw-1 never came online")
    module = versioned_module(tmp_path / "code", "1")
    deploy = ["deploy", str(module), "--id", "f", "--version", "1", "--wait", "20", "--json"]
    os.environ.pop("EDGECTL_SIGN_KEY", None)
    assert ctl.main([*base, *deploy, "--node", "gw-1", "--sign-key", str(key)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["active"] == 1, report
    assert ctl.main([*base, *deploy, "--fleet", "--sign-key", str(key)]) == 0
    capsys.readouterr()

    module = versioned_module(tmp_path / "code2", "2")
    unsigned = ["deploy", str(module), "--id", "f", "--version", "2", "--node", "gw-1"]
    assert ctl.main([*base, *unsigned, "--wait", "20", "--json"]) == ctl.EXIT_FAILED
    report = json.loads(capsys.readouterr().out)
    error = report["nodes"]["gw-1"]["error"]
    assert "requires signed specs" in error["message"], report
    assert report["nodes"]["gw-1"]["active_version"] == "1"


def test_staged_rollout_signs_every_spec_and_rolls_back_with_a_higher_sequence(
    key: Path, broker: Mosquitto, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """Canaries, the fleet spec and the rollback are all signed for their target, with
    sequences that only go up, so the trusting agents take every one of them."""
    for node in ("gw-1", "gw-2"):
        agent_factory(node, trust={"keys": [f"{key}.pub"]}).start()
    recorder = SpecRecorder(broker.port)
    try:
        with connect(broker.port, heartbeat_interval_s=1.0, sign_key=str(key)) as cluster:
            wait_for(lambda: len(cluster.list_nodes()) == 2, 15, "the two agents never came online")
            v1 = function_spec(versioned_module(tmp_path / "v1", "1"), id="f", version="1")
            cluster.controller.deploy_nodes(v1, ["gw-1", "gw-2"])  # each node's own spec
            assert cluster.wait_for_rollout(v1, ["gw-1", "gw-2"], timeout=30).ok

            broken = versioned_module(tmp_path / "v2", "2", broken=True)
            v2 = function_spec(broken, id="f", version="2")
            result = cluster.rollout(v2, canary=1, canary_timeout=30, timeout=30)
            assert result.rolled_back and result.rollback is not None, result.to_dict()
            assert result.rollback.ok, result.rollback.to_dict()  # v1 again, re-signed

            for node in ("gw-1", "gw-2"):  # own specs win over the fleet's: clear them
                cluster.controller.clear_spec("f", node)
            v3 = function_spec(versioned_module(tmp_path / "v3", "3"), id="f", version="3")
            result = cluster.rollout(v3, canary=1, canary_timeout=30, timeout=30)
            assert result.ok, result.to_dict()
            for node in ("gw-1", "gw-2"):
                assert cluster.get_runtime(node).invoke("f", None)["version"] == "3"
        published = recorder.published()
    finally:
        recorder.close()
    last: dict[str, int] = {}
    assert len(published) >= 6, published
    for topic, spec in published:
        target = "fleet" if topic.startswith("edge/fleet/") else topic.split("/")[2]
        assert isinstance(spec["signature"], dict), f"unsigned spec on {topic}"
        assert spec["target"] == target, (topic, spec["target"])
        assert spec["sequence"] > last.get(topic, -1), f"sequence went down on {topic}"
        last[topic] = spec["sequence"]


def test_agent_refuses_a_key_file_others_can_write_with_exit_78(
    key: Path, agent_factory: AgentFactory
) -> None:
    """A group-writable trust key (anyone in the group could swap it) stops the agent."""
    public = Path(f"{key}.pub")
    public.chmod(0o664)
    agent = agent_factory("gw-1", trust={"keys": [str(public)]}).start()
    assert agent.wait_exit() == 78
    assert "is group-writable" in agent.log() and "trust.keys[0]" in agent.log()
    public.chmod(0o644)
    key.parent.chmod(0o777)
    agent = agent_factory("gw-1", trust={"keys": [str(public)]}).start()
    assert agent.wait_exit() == 78
    assert "its directory" in agent.log()


@pytest.mark.parametrize(
    ("entrypoint", "why"),
    [
        ("os:system", "is a standard library module"),
        ("json:loads", "is a standard library module"),
        ("sys:exit", "is a built-in module"),
        ("paho.mqtt:client", "installed at|a module the agent has loaded"),
        ("agent:ctl", "a module the agent has loaded"),
    ],
)
def test_entrypoint_module_outside_the_bundle_is_rejected(
    tmp_path: Path, entrypoint: str, why: str
) -> None:
    """os:system resolved to the standard library, not the bundle's own os.py."""
    module = entrypoint.split(":")[0].split(".")[0]
    source = f"def {entrypoint.split(':')[1]}(x):\n    return x\n".encode()
    fmt = "source" if "." not in entrypoint.split(":")[0] else "zip"
    raw = source
    if fmt == "zip":
        from conftest import make_zip

        raw = make_zip({f"{module}/__init__.py": "", f"{module}/mqtt.py": source})
    with pytest.raises(DeploymentRejected, match=why):
        bundles.install_bundle(
            tmp_path,
            "f",
            "1",
            fmt,
            raw,
            bundles.sha256_hex(raw),
            entrypoint,
            max_bytes=1 << 20,
            max_files=10,
        )
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").iterdir())


def test_installed_code_is_compared_with_the_bundle(tmp_path: Path) -> None:
    """verify_installed names a changed, an added and a missing file."""
    raw = b"def handler(event):\n    return event\n"
    args = ("source", raw, "h:handler")
    code_dir = bundles.install_bundle(
        tmp_path, "f", "1", "source", raw, bundles.sha256_hex(raw), "h:handler",
        max_bytes=1 << 20, max_files=10,
    )  # fmt: skip
    assert bundles.verify_installed(code_dir, *args) is None
    (code_dir / "os.py").write_text("x = 1\n")
    assert "os.py was added after install" in (bundles.verify_installed(code_dir, *args) or "")
    (code_dir / "os.py").unlink()
    (code_dir / "h.py").write_text("import os\n")
    assert "h.py was modified after install" in (bundles.verify_installed(code_dir, *args) or "")
    (code_dir / "h.py").unlink()
    assert "h.py is missing" in (bundles.verify_installed(code_dir, *args) or "")
    spec = protocol.FunctionSpec(
        "f", "f", "1", "h:handler", protocol.CodeSpec("source", raw.decode(), "0" * 64), 64, 1.0
    )
    assert spec.signature is None  # unsigned specs stay decodable and encodable
