"""Deployments over MQTT against a real agent process: fleet and node specs, removal,
``requires``, idempotent re-delivery, zip bundles, and rejections that keep the old version."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from conftest import make_zip

from testing.agent_process import AgentProcess
from testing.cloud import Cloud
from testing.specs import source_spec, zip_spec
from testing.wait import wait_for

NODE = "gw-test"
STATE = "edge/nodes/gw-test/functions/{}/state"
FLEET = "edge/fleet/functions/{}"
NODE_SPEC = "edge/nodes/gw-test/functions/{}"

AgentFactory = Callable[..., AgentProcess]


def versioned(fid: str, version: str, **over: Any) -> dict[str, Any]:
    """A source spec whose handler answers with its own version and its worker's pid."""
    source = (
        "import os\n\n"
        f"VERSION = {version!r}\n\n\n"
        "def handler(event):\n"
        "    return {'version': VERSION, 'pid': os.getpid()}\n"
    )
    return source_spec(fid, source, version=version, **over)


def wait_state(cloud: Cloud, fid: str, state: str, version: str | None = None) -> dict[str, Any]:
    return cloud.wait_message(
        STATE.format(fid),
        lambda m: m["state"] == state and (version is None or m["version"] == version),
    )


def deploy_active(cloud: Cloud, spec: dict[str, Any], *, node: str | None = None) -> None:
    cloud.deploy(node, spec)
    wait_state(cloud, spec["id"], "active", spec["version"])


def answer(cloud: Cloud, fid: str) -> dict[str, Any]:
    reply = cloud.invoke(NODE, fid, None)
    assert reply["ok"] is True, reply
    return reply


def started(agent_factory: AgentFactory, cloud: Cloud, **sections: Any) -> AgentProcess:
    agent = agent_factory(**sections).start()
    cloud.wait_message("edge/nodes/gw-test/status", lambda m: m["status"] == "online")
    return agent


def test_fleet_spec_deploys_into_versioned_bundle_dir_and_reports_active(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """A fleet spec becomes an active function installed under functions/<id>/<version>-<sha12>."""
    agent = started(agent_factory, cloud)
    spec = versioned("thermo", "1.0.0")
    cloud.deploy(None, spec)
    state = wait_state(cloud, "thermo", "active")
    assert state["function_id"] == "thermo"
    assert state["version"] == "1.0.0"
    assert state["sha256"] == spec["code"]["sha256"]
    assert state["error"] is None
    assert state["ts"].endswith("Z")
    code_dir = agent.state_dir / "functions" / "thermo" / f"1.0.0-{spec['code']['sha256'][:12]}"
    assert (code_dir / "mod_thermo.py").is_file(), sorted(agent.state_dir.rglob("*"))
    assert answer(cloud, "thermo")["result"]["version"] == "1.0.0"


def test_node_spec_overrides_fleet_spec_and_removing_it_falls_back(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """The node's own spec wins over the fleet's whichever comes later; removing it falls back."""
    agent = started(agent_factory, cloud)
    deploy_active(cloud, versioned("f", "1"))
    deploy_active(cloud, versioned("f", "2"), node=NODE)
    assert answer(cloud, "f")["result"]["version"] == "2"

    # A newer fleet spec does not displace the node's own: the control function deploys after
    # it on the same (one-at-a-time) deployer, so a wrong redeploy would have finished first.
    cloud.deploy(None, versioned("f", "3"))
    deploy_active(cloud, versioned("control", "1"))
    assert answer(cloud, "f")["result"]["version"] == "2"
    assert [m for m in cloud.on(STATE.format("f")) if m["version"] == "3"] == []
    assert agent.log().count("deploying f 3") == 0

    cloud.publish(NODE_SPEC.format("f"), b"", retain=True)
    wait_state(cloud, "f", "active", "3")
    assert answer(cloud, "f")["result"]["version"] == "3"


def test_empty_retained_spec_removes_function_and_its_code(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """An empty retained payload removes the function: state removed, invocations not found."""
    agent = started(agent_factory, cloud)
    deploy_active(cloud, versioned("gone", "7"))
    answer(cloud, "gone")
    cloud.publish(FLEET.format("gone"), b"", retain=True)
    removed = wait_state(cloud, "gone", "removed")
    assert removed["version"] == "7"
    assert removed["error"] is None
    reply = cloud.invoke(NODE, "gone", None)
    assert reply["ok"] is False
    assert reply["error"]["type"] == "function_not_found", reply
    assert not (agent.state_dir / "functions" / "gone").exists()


def test_spec_requiring_missing_capability_is_skipped_without_state_message(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """A spec whose `requires` the node lacks is skipped and nothing is said about it."""
    agent = started(agent_factory, cloud)  # capabilities: ["python"]
    cloud.deploy(None, versioned("camera", "1", requires=["python", "camera"]))
    deploy_active(cloud, versioned("control", "1", requires=["python"]))
    assert cloud.on(STATE.format("camera")) == []
    assert "skipping camera" in agent.log()
    reply = cloud.invoke(NODE, "camera", None)
    assert reply["error"]["type"] == "function_not_found", reply


def test_redelivered_identical_spec_is_a_noop(cloud: Cloud, agent_factory: AgentFactory) -> None:
    """Publishing the same spec again neither redeploys nor restarts the warm worker."""
    agent = started(agent_factory, cloud)
    spec = versioned("same", "1")
    deploy_active(cloud, spec)
    first = answer(cloud, "same")

    cloud.deploy(None, spec)
    deploy_active(cloud, versioned("control", "1"))
    second = answer(cloud, "same")
    assert agent.log().count("deploying same 1") == 1, agent.log()[-3000:]
    assert len([m for m in cloud.on(STATE.format("same")) if m["state"] == "active"]) == 1
    assert second["cold_start"] is False
    assert second["result"]["pid"] == first["result"]["pid"]


def test_zip_bundle_with_package_entrypoint_deploys_and_serves(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """A zip bundle is unpacked and its ``package.module:attr`` entrypoint imports siblings."""
    agent = started(agent_factory, cloud)
    bundle = make_zip(
        {
            "sensorpkg/__init__.py": "",
            "sensorpkg/convert.py": "def c_to_f(c):\n    return c * 1.8 + 32\n",
            "sensorpkg/main.py": (
                "from sensorpkg.convert import c_to_f\n\n\n"
                "def handler(event):\n"
                "    return {'f': c_to_f(event['c'])}\n"
            ),
        }
    )
    spec = zip_spec("sensor", bundle, "sensorpkg.main:handler")
    deploy_active(cloud, spec)
    reply = cloud.invoke(NODE, "sensor", {"c": 100})
    assert reply["ok"] is True, reply
    assert reply["result"] == {"f": 212.0}
    code_dir = agent.state_dir / "functions" / "sensor" / f"1-{spec['code']['sha256'][:12]}"
    assert (code_dir / "sensorpkg" / "convert.py").is_file()


def _bad_sha256() -> dict[str, Any]:
    spec = versioned("f", "2")
    spec["code"]["sha256"] = hashlib.sha256(b"something else").hexdigest()
    return spec


def _corrupt_zip() -> dict[str, Any]:
    return zip_spec("f", b"PK\x03\x04 this is not a zip at all", "mod_f:handler", version="2")


def _zip_slip() -> dict[str, Any]:
    bundle = make_zip(
        {"mod_f.py": "def handler(event):\n    return 'v2'\n", "../escape.py": "x = 1\n"}
    )
    return zip_spec("f", bundle, "mod_f:handler", version="2")


def _over_memory() -> dict[str, Any]:
    return versioned("f", "2", memory_mb=4096)  # the node's runtime.max_memory_mb is 1024


def _import_error() -> dict[str, Any]:
    source = "import no_such_module_anywhere\n\n\ndef handler(event):\n    return 'v2'\n"
    return source_spec("f", source, version="2")


def _missing_attr() -> dict[str, Any]:
    return versioned("f", "2", entrypoint="mod_f:no_such_handler")


REJECTIONS = [
    pytest.param(_bad_sha256, "rejected", id="bad-sha256"),
    pytest.param(_corrupt_zip, "rejected", id="corrupt-zip"),
    pytest.param(_zip_slip, "rejected", id="zip-dotdot-member"),
    pytest.param(_over_memory, "rejected", id="over-max-memory"),
    pytest.param(_import_error, "failed", id="import-error"),
    pytest.param(_missing_attr, "failed", id="missing-entrypoint-attr"),
]


@pytest.mark.parametrize(("make_spec", "state"), REJECTIONS)
def test_bad_new_version_is_refused_and_old_version_keeps_serving(
    cloud: Cloud, agent_factory: AgentFactory, make_spec: Callable[[], dict[str, Any]], state: str
) -> None:
    """A bad version 2 is reported (rejected/failed) naming active version 1, which answers."""
    agent = started(agent_factory, cloud)
    deploy_active(cloud, versioned("f", "1"))
    before = answer(cloud, "f")

    cloud.deploy(None, make_spec())
    report = wait_state(cloud, "f", state, "2")
    assert report["error"]["type"] == "deployment_rejected", report
    assert report["error"]["message"], report
    assert report["active_version"] == "1", report
    after = answer(cloud, "f")
    assert after["result"] == before["result"], "version 1's warm worker should still serve"
    assert not any(p.name == "escape.py" for p in agent.workdir.rglob("escape.py"))


def test_malformed_spec_json_is_rejected_and_old_version_keeps_serving(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """A spec that is not JSON is rejected with deployment_rejected; version 1 keeps serving."""
    started(agent_factory, cloud)
    deploy_active(cloud, versioned("f", "1"))
    cloud.publish(FLEET.format("f"), b"{this is not json", retain=True)
    report = wait_state(cloud, "f", "rejected")
    assert report["error"]["type"] == "deployment_rejected", report
    assert "not JSON" in report["error"]["message"], report
    assert report["version"] is None
    assert answer(cloud, "f")["result"]["version"] == "1"


def test_unparseable_spec_state_names_the_active_version(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """The rejected state of a spec that does not parse names the version still serving."""
    started(agent_factory, cloud)
    deploy_active(cloud, versioned("f", "1"))
    cloud.publish(FLEET.format("f"), b"{this is not json", retain=True)
    report = wait_state(cloud, "f", "rejected")
    assert report["active_version"] == "1", report


def test_republishing_good_spec_after_unparseable_one_reports_active_again(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """Rolling back to the serving spec after a malformed one must clear the 'rejected' state."""
    started(agent_factory, cloud)
    good = versioned("f", "1")
    deploy_active(cloud, good)
    cloud.publish(FLEET.format("f"), json.dumps({"id": "f", "memory_mb": 0}).encode(), retain=True)
    wait_state(cloud, "f", "rejected")
    count = len(cloud.on(STATE.format("f")))
    cloud.deploy(None, good)
    # deployer threads run in parallel: wait for f's own report, not for another function's
    wait_for(
        lambda: (
            len(cloud.on(STATE.format("f"))) > count
            and cloud.on(STATE.format("f"))[-1]["state"] == "active"
        ),
        15,
        "the retained state still says 'rejected' while version 1 serves",
    )


def test_removing_fleet_spec_leaves_node_spec_serving(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """Removing the fleet spec does not touch a node that has its own spec of that id."""
    started(agent_factory, cloud)
    deploy_active(cloud, versioned("f", "1"))
    deploy_active(cloud, versioned("f", "2"), node=NODE)
    cloud.publish(FLEET.format("f"), b"", retain=True)
    deploy_active(cloud, versioned("control", "1"))
    assert [m["state"] for m in cloud.on(STATE.format("f"))] == ["active", "active"]
    assert answer(cloud, "f")["result"]["version"] == "2"


def test_spec_gaining_unmet_requirement_removes_deployed_version(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """A deployed function whose new spec requires a missing capability is removed here."""
    started(agent_factory, cloud)
    deploy_active(cloud, versioned("f", "1"))
    cloud.deploy(None, versioned("f", "2", requires=["gpio"]))
    removed = wait_state(cloud, "f", "removed")
    assert removed["version"] == "1"
    assert cloud.invoke(NODE, "f", None)["error"]["type"] == "function_not_found"


def test_spec_superseded_while_deploying_ends_on_the_newest(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """Two versions published back to back: the newer one ends up active and answering."""
    agent = started(agent_factory, cloud)
    cloud.deploy(None, versioned("f", "1"))
    cloud.deploy(None, versioned("f", "2"))
    wait_state(cloud, "f", "active", "2")
    deploy_active(cloud, versioned("control", "1"))
    assert answer(cloud, "f")["result"]["version"] == "2"
    states = cloud.on(STATE.format("f"))
    assert states[-1]["version"] == "2", states
    installed = sorted(p.name for p in (agent.state_dir / "functions" / "f").iterdir())
    assert any(name.startswith("2-") for name in installed), installed


def test_new_version_keeps_previous_bundle_and_prunes_older_ones(
    cloud: Cloud, agent_factory: AgentFactory
) -> None:
    """After v3 activates, v2's bundle stays (the rollback target) and v1's is pruned."""
    agent = started(agent_factory, cloud)
    specs = [versioned("f", v) for v in ("1", "2", "3")]
    for spec in specs:
        deploy_active(cloud, spec)
    function_dir = agent.state_dir / "functions" / "f"
    installed = sorted(p.name for p in function_dir.iterdir())
    expected = sorted(f"{s['version']}-{s['code']['sha256'][:12]}" for s in specs[1:])
    assert installed == expected
    assert answer(cloud, "f")["result"]["version"] == "3"
