"""Deployments under faults (issue 12, items 5 and 6): disk quota and slow test-loads.

Before: 1.8 MB of fleet specs became 288 MiB on every gateway (zips at 161:1) with no quota
on installed code or on the number of functions; a spec whose import slept 45 s delayed an
unrelated fix by 44.6 s (one deployer thread, the test-load bounded only by max_timeout_s).
Real agent processes, a real broker, real files under the agent's state dir.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from conftest import make_zip

from testing.agent_process import AgentProcess
from testing.cloud import Cloud
from testing.specs import source_spec, zip_spec

NODE = "gw-test"
STATE = "edge/nodes/gw-test/functions/{}/state"
FLEET = "edge/fleet/functions/{}"

AgentFactory = Callable[..., AgentProcess]

MiB = 1024 * 1024


def started(agent_factory: AgentFactory, cloud: Cloud, **sections: Any) -> AgentProcess:
    agent = agent_factory(**sections).start()
    cloud.wait_message("edge/nodes/gw-test/status", lambda m: m["status"] == "online")
    return agent


def wait_state(
    cloud: Cloud, fid: str, state: str, version: str | None = None, timeout: float = 15.0
) -> dict[str, Any]:
    return cloud.wait_message(
        STATE.format(fid),
        lambda m: m["state"] == state and (version is None or m["version"] == version),
        timeout,
    )


def versioned(fid: str, version: str, **over: Any) -> dict[str, Any]:
    source = f"def handler(event):\n    return {{'version': {version!r}}}\n"
    return source_spec(fid, source, version=version, **over)


def padded_zip(fid: str, version: str, mib: int) -> dict[str, Any]:
    """A zip spec that unpacks to ``mib`` MiB of zeros (1 MiB members: ~1000:1 each, but
    none over the bomb check's 1 MiB floor) plus a handler: a few KB on the wire."""
    module = f"mod_{fid.replace('-', '_')}"
    members: dict[str, str | bytes] = {
        f"{module}/__init__.py": f"def handler(event):\n    return {{'version': {version!r}}}\n"
    }
    for i in range(mib):
        members[f"{module}/pad{i}.bin"] = bytes(MiB)
    spec = zip_spec(fid, make_zip(members), f"{module}:handler", version=version)
    assert len(spec["code"]["data"]) < 64 * 1024  # the ratio is the point
    return spec


def installed(agent: AgentProcess, fid: str) -> list[str]:
    root = agent.state_dir / "functions" / fid
    return sorted(p.name.split("-")[0] for p in root.iterdir() if not p.name.startswith("."))


def test_zip_at_high_ratio_over_max_code_mb_is_rejected_with_the_numbers(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """Installed code had no quota: a few KB of zip became MiBs on disk on every gateway."""
    agent = started(agent_factory, cloud, runtime={"max_code_mb": 5})
    cloud.deploy(None, padded_zip("big-a", "1", 2))
    wait_state(cloud, "big-a", "active", "1")
    cloud.deploy(None, padded_zip("big-a", "2", 2))
    wait_state(cloud, "big-a", "active", "2")
    # v1 (the previous version) is kept beside v2; v3 only fits once v1 is pruned first.
    cloud.deploy(None, padded_zip("big-a", "3", 2))
    wait_state(cloud, "big-a", "active", "3")
    assert installed(agent, "big-a") == ["2", "3"], installed(agent, "big-a")
    cloud.deploy(None, padded_zip("big-b", "1", 2))
    refused = wait_state(cloud, "big-b", "rejected", "1")
    message = refused["error"]["message"]
    assert refused["error"]["type"] == "deployment_rejected", refused
    assert "runtime.max_code_mb (5 MB)" in message and "MB" in message, message
    assert not (agent.state_dir / "functions" / "big-b").exists() or not installed(
        agent, "big-b"
    ), "a rejected bundle left files behind"
    reply = cloud.invoke(NODE, "big-a", None)
    assert reply["ok"] and reply["result"] == {"version": "3"}, reply


def test_function_over_max_functions_is_rejected_until_one_is_removed(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """The number of functions was unbounded: every fleet spec became a deployment."""
    started(agent_factory, cloud, runtime={"max_functions": 2})
    for fid in ("f1", "f2"):
        cloud.deploy(None, versioned(fid, "1"))
        wait_state(cloud, fid, "active", "1")
    cloud.deploy(None, versioned("f3", "1"))
    refused = wait_state(cloud, "f3", "rejected", "1")
    assert "runtime.max_functions (2)" in refused["error"]["message"], refused
    assert cloud.invoke(NODE, "f3", None)["error"]["type"] == "function_not_found"
    cloud.publish(FLEET.format("f1"), b"", retain=True)  # removing one makes room
    wait_state(cloud, "f1", "removed")
    wait_state(cloud, "f3", "active", "1")
    assert cloud.invoke(NODE, "f3", None)["result"] == {"version": "1"}


HANGS_ON_IMPORT = "import time\n\ntime.sleep(3600)\n\n\ndef handler(event):\n    return 'never'\n"


def test_hanging_import_does_not_delay_another_functions_deployment(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """One deployer thread: a spec whose import slept 45 s delayed an unrelated fix by 44.6 s."""
    started(agent_factory, cloud, runtime={"deploy_timeout_s": 10})
    cloud.deploy(None, versioned("slow", "1"))
    wait_state(cloud, "slow", "active", "1")
    hang = source_spec("slow", HANGS_ON_IMPORT, version="2", timeout_seconds=300)
    begun = time.monotonic()
    cloud.deploy(None, hang)
    cloud.deploy(None, versioned("fix", "1"))
    wait_state(cloud, "fix", "active", "1", timeout=5.0)
    fix_took = time.monotonic() - begun
    assert fix_took < 5.0, f"the fix waited {fix_took:.1f}s behind a hanging import"
    # The hanging version fails at runtime.deploy_timeout_s, not at its timeout_seconds (300).
    failed = wait_state(cloud, "slow", "failed", "2", timeout=25.0)
    failed_after = time.monotonic() - begun
    assert 9.0 <= failed_after <= 20.0, f"failed after {failed_after:.1f}s"
    assert "runtime.deploy_timeout_s (10s)" in failed["error"]["message"], failed
    assert failed["active_version"] == "1", failed
    reply = cloud.invoke(NODE, "slow", None)  # the old version kept serving
    assert reply["ok"] and reply["result"] == {"version": "1"}, reply


def test_newer_spec_of_a_function_waits_for_its_own_test_load_only(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """Two versions of one function must not be prepared at once (one job per function)."""
    started(agent_factory, cloud, runtime={"deploy_timeout_s": 10})
    cloud.deploy(None, source_spec("one", HANGS_ON_IMPORT, version="1"))
    cloud.deploy(None, versioned("one", "2"))
    wait_state(cloud, "one", "active", "2", timeout=25.0)
    assert cloud.invoke(NODE, "one", None)["result"] == {"version": "2"}
    states = [(m["state"], m["version"]) for m in cloud.on(STATE.format("one"))]
    assert ("active", "1") not in states, states
