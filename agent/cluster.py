"""``EdgeCluster``: the seed's cluster of edge nodes, in one process (local mode)."""

from __future__ import annotations

from datetime import datetime

from agent.models import EdgeFunction, EdgeNode, EdgeNodeStatus
from agent.runtime import EdgeRuntime


class EdgeCluster:
    """Manage a cluster of edge nodes, each with its own :class:`EdgeRuntime`."""

    def __init__(self) -> None:
        self._nodes: dict[str, EdgeNode] = {}
        self._runtimes: dict[str, EdgeRuntime] = {}

    def register_node(self, node: EdgeNode) -> None:
        """Register an edge node (re-registering an id replaces it and its runtime)."""
        old = self._runtimes.pop(node.id, None)
        if old is not None:
            old.close()
        self._nodes[node.id] = node
        self._runtimes[node.id] = EdgeRuntime(node)

    def deregister_node(self, node_id: str) -> bool:
        if node_id not in self._nodes:
            return False
        del self._nodes[node_id]
        self._runtimes.pop(node_id).close()
        return True

    def get_node(self, node_id: str) -> EdgeNode | None:
        return self._nodes.get(node_id)

    def get_runtime(self, node_id: str) -> EdgeRuntime | None:
        return self._runtimes.get(node_id)

    def list_nodes(self, status: EdgeNodeStatus | None = None) -> list[EdgeNode]:
        nodes = list(self._nodes.values())
        if status:
            nodes = [n for n in nodes if n.status == status]
        return nodes

    def deploy_to_all(self, function: EdgeFunction) -> int:
        """Deploy to every ONLINE node; returns how many nodes got it.

        The seed also deployed to offline nodes; a function cannot run there, so they are
        skipped here (they get it when they come back and are deployed to again).
        """
        count = 0
        for node_id, runtime in self._runtimes.items():
            if self._nodes[node_id].status is EdgeNodeStatus.OFFLINE:
                continue
            runtime.deploy(function)
            count += 1
        return count

    def heartbeat(self, node_id: str) -> None:
        """Mark a node ONLINE now; an unknown id is a no-op."""
        node = self._nodes.get(node_id)
        if node is not None:
            node.last_heartbeat = datetime.now()
            node.status = EdgeNodeStatus.ONLINE

    def close(self) -> None:
        for runtime in self._runtimes.values():
            runtime.close()

    def __enter__(self) -> EdgeCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
