"""Worker processes and the pool that runs invocations in them: the only package that spawns,
signals and reaps processes. ``core``: the pool; ``process``: one worker process."""

from agent.exec.pool.core import (
    EMPTY_CONTEXT,
    ContextInput,
    FunctionConfig,
    InvokeResult,
    WorkerPool,
)
from agent.exec.pool.process import BASE_ENV, Worker, WorkerLimits, WorkerState

__all__ = [
    "BASE_ENV",
    "EMPTY_CONTEXT",
    "ContextInput",
    "FunctionConfig",
    "InvokeResult",
    "Worker",
    "WorkerLimits",
    "WorkerPool",
    "WorkerState",
]
