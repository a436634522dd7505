"""edge-agent: the IoT gateway agent and the seed's Python API.

Names are imported lazily so that ``python -m agent.exec.worker`` (a fresh interpreter per
function worker) pays only for what the worker needs.
"""

from __future__ import annotations

import importlib

# Not `from typing import ...`: typing costs each worker ~30 ms of start-up (agent/exec/pool/).
TYPE_CHECKING = False

__version__ = "0.1.0"

_EXPORTS = {
    "EdgeNodeStatus": "agent.models",
    "EdgeNode": "agent.models",
    "EdgeFunction": "agent.models",
    "PackagedHandler": "agent.models",
    "SyncState": "agent.models",
    "EdgeExecutionError": "agent.errors",
    "FunctionTimeout": "agent.errors",
    "MemoryLimitExceeded": "agent.errors",
    "HandlerError": "agent.errors",
    "WorkerCrashed": "agent.errors",
    "FunctionNotFound": "agent.errors",
    "BadRequest": "agent.errors",
    "Overloaded": "agent.errors",
    "DeploymentRejected": "agent.errors",
    "ConfigError": "agent.errors",
    "AgentError": "agent.errors",
    "EdgeRuntime": "agent.local.runtime",
    "EdgeSynchronizer": "agent.local.synchronizer",
    "EdgeMetrics": "agent.exec.metrics",
    "InvocationRecord": "agent.exec.metrics",
    "EdgeCluster": "agent.local.cluster",
}

__all__ = [
    "AgentError",
    "BadRequest",
    "ConfigError",
    "DeploymentRejected",
    "EdgeCluster",
    "EdgeExecutionError",
    "EdgeFunction",
    "EdgeMetrics",
    "EdgeNode",
    "EdgeNodeStatus",
    "EdgeRuntime",
    "EdgeSynchronizer",
    "FunctionNotFound",
    "FunctionTimeout",
    "HandlerError",
    "InvocationRecord",
    "MemoryLimitExceeded",
    "Overloaded",
    "PackagedHandler",
    "SyncState",
    "WorkerCrashed",
]

if TYPE_CHECKING:
    from typing import Any

    from agent.errors import (
        AgentError,
        BadRequest,
        ConfigError,
        DeploymentRejected,
        EdgeExecutionError,
        FunctionNotFound,
        FunctionTimeout,
        HandlerError,
        MemoryLimitExceeded,
        Overloaded,
        WorkerCrashed,
    )
    from agent.exec.metrics import EdgeMetrics, InvocationRecord
    from agent.local.cluster import EdgeCluster
    from agent.local.runtime import EdgeRuntime
    from agent.local.synchronizer import EdgeSynchronizer
    from agent.models import EdgeFunction, EdgeNode, EdgeNodeStatus, PackagedHandler, SyncState


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
