"""Worker processes and the pool that runs invocations in them: the only package that spawns,
signals and reaps processes.

``core``: the pool (WorkerPool, composing the parts below); ``slots``: allocation only;
``loading``: loading a handler, load-failure backoff; ``prestart``: the prestart thread;
``conversation``: one invocation's exchange with its worker; ``config``: FunctionConfig and
the other plain data; ``process``: one worker process and the spawner (the pool's one seam
to the OS, faked by ``testing.spawner``); ``sampler``: a function's whole-tree memory."""

from agent.exec.pool.config import EMPTY_CONTEXT, ContextInput, FunctionConfig, InvokeResult
from agent.exec.pool.core import WorkerPool
from agent.exec.pool.process import (
    BASE_ENV,
    ProcessSpawner,
    Spawner,
    Worker,
    WorkerLimits,
    WorkerState,
)

__all__ = [
    "BASE_ENV",
    "EMPTY_CONTEXT",
    "ContextInput",
    "FunctionConfig",
    "InvokeResult",
    "ProcessSpawner",
    "Spawner",
    "Worker",
    "WorkerLimits",
    "WorkerPool",
    "WorkerState",
]
