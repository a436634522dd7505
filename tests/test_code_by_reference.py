"""Code too big for a spec comes by reference: ``code {format, url, sha256, size}``, fetched
by the deployer (agent/edge/fetch.py) with size and SHA-256 checked while it streams, kept so a
restart restores it without the network. Real agent, real broker, file:// URLs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testing.agent_process import AgentProcess
from testing.cloud import Cloud
from testing.specs import source_spec

NODE = "gw-test"
BASE = f"edge/nodes/{NODE}"
SOURCE = "def handler(event):\n    return {'by_reference': event}\n"


def by_reference(tmp_path: Path, source: str, **over: Any) -> dict[str, Any]:
    bundle = tmp_path / "bundle.py"
    bundle.write_text(source)
    raw = source.encode()
    spec = source_spec("ref", source, entrypoint="refmod:handler")
    spec["code"] = {
        "format": "source",
        "url": bundle.as_uri(),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "size": len(raw),
        **over,
    }
    return spec


def final_state(cloud: Cloud) -> dict[str, Any]:
    return cloud.wait_message(
        f"{BASE}/functions/ref/state", lambda m: m["state"] in ("active", "failed", "rejected")
    )


def test_code_by_reference_is_fetched_checked_and_restored_offline(
    cloud: Cloud, agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent = agent_factory(runtime={"allow_file_code_urls": True}).start()
    cloud.deploy(None, by_reference(tmp_path, SOURCE))
    assert final_state(cloud)["state"] == "active"
    assert cloud.invoke(NODE, "ref", 7)["result"] == {"by_reference": 7}
    (tmp_path / "bundle.py").unlink()  # the source is gone: a restart must not need it
    agent.stop()
    agent.start()
    agent.wait_log("restored 1 deployed functions")
    assert cloud.invoke(NODE, "ref", 8, timeout=15)["result"] == {"by_reference": 8}


def test_code_whose_bytes_do_not_match_the_reference_is_rejected(
    cloud: Cloud, agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """A reference is only as good as its digest: other bytes at the URL never run."""
    agent_factory(runtime={"allow_file_code_urls": True}).start()
    cloud.deploy(None, by_reference(tmp_path, SOURCE, sha256="0" * 64))
    state = final_state(cloud)
    assert state["state"] == "rejected" and "sha256" in state["error"]["message"].lower(), state


def test_file_urls_are_refused_unless_allowed(
    cloud: Cloud, agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent_factory().start()
    cloud.deploy(None, by_reference(tmp_path, SOURCE))
    state = final_state(cloud)
    assert state["state"] == "rejected" and "not allowed" in state["error"]["message"], state
