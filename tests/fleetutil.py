"""Helpers for the fleet controller and edgectl tests: simulated nodes, a connected cluster,
handler modules on disk, and waits that say what did not happen."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import REPO, wait_for

from agent.local.cluster import EdgeCluster
from agent.models import EdgeNode, EdgeNodeStatus

sys.path.insert(0, str(REPO / "scripts"))

from fleet_sim import SimFleet

__all__ = ["SimFleet", "connect", "sim_fleet", "versioned_module", "wait_status"]


@contextmanager
def sim_fleet(port: int, count: int, **kwargs: Any) -> Iterator[SimFleet]:
    """``count`` simulated gateways (sim-0000, ...) connected to the broker on ``port``."""
    fleet = SimFleet("127.0.0.1", port, count, **kwargs)
    fleet.start(timeout=30)
    try:
        yield fleet
    finally:
        fleet.stop()


def connect(port: int, **kwargs: Any) -> EdgeCluster:
    kwargs.setdefault("timeout", 10.0)
    return EdgeCluster.connect("127.0.0.1", port, **kwargs)


def wait_status(
    cluster: EdgeCluster, node_id: str, status: EdgeNodeStatus, timeout: float = 10.0
) -> EdgeNode:
    def check() -> EdgeNode | None:
        node = cluster.get_node(node_id)
        return node if node is not None and node.status is status else None

    def describe() -> str:
        node = cluster.get_node(node_id)
        seen = "never seen" if node is None else f"is {node.status.value} {node.metadata}"
        return f"{node_id} did not become {status.value}: {seen}"

    node = wait_for(check, timeout, f"{node_id} did not become {status.value}")
    if node is None:  # pragma: no cover - wait_for fails first
        raise AssertionError(describe())
    return node  # type: ignore[no-any-return]


def versioned_module(directory: Path, version: str, *, broken: bool = False) -> Path:
    """``versioned.py`` answering its version and pid; ``broken`` fails at import time."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "versioned.py"
    lines = ["import os", ""]
    if broken:
        lines.append(f"raise RuntimeError('version {version} cannot start')")
    lines += [
        f"VERSION = {version!r}",
        "",
        "",
        "def handler(event):",
        "    return {'version': VERSION, 'pid': os.getpid()}",
        "",
    ]
    path.write_text("\n".join(lines))
    return path
