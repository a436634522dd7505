"""``EdgeRuntime``: the seed's API on top of the worker pool, with the limits made real.

Each ``invoke`` runs in a worker subprocess (see :mod:`agent.exec.pool`): ``timeout_seconds`` is
enforced by SIGKILL to the worker's process group, ``memory_mb`` by RLIMIT_DATA set before
the handler loads, ``environment`` is the worker's environment on top of a clean base.
Callables are shipped to the worker by value with cloudpickle; results come back pickled,
which is safe here because the handler is the caller's own code (the daemon, which runs
code from the cloud, uses the JSON codec instead).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import uuid
import weakref
from typing import Any

from agent.errors import DeploymentRejected, EdgeExecutionError, FunctionNotFound
from agent.exec.metrics import EdgeMetrics, InvocationRecord, success_record
from agent.exec.pool import ContextInput, FunctionConfig, InvokeResult, WorkerLimits, WorkerPool
from agent.local.synchronizer import EdgeSynchronizer
from agent.models import EdgeFunction, EdgeNode, PackagedHandler


def function_config(fn: EdgeFunction) -> FunctionConfig:
    """Validate an EdgeFunction and turn it into what the pool runs."""
    if not isinstance(fn.memory_mb, int) or isinstance(fn.memory_mb, bool) or fn.memory_mb < 1:
        raise DeploymentRejected(
            f"{fn.id}: memory_mb must be a positive integer, got {fn.memory_mb!r}"
        )
    if not isinstance(fn.timeout_seconds, int | float) or fn.timeout_seconds <= 0:
        raise DeploymentRejected(
            f"{fn.id}: timeout_seconds must be a positive number, got {fn.timeout_seconds!r}"
        )
    if not isinstance(fn.concurrency, int) or fn.concurrency < 1:
        raise DeploymentRejected(f"{fn.id}: concurrency must be >= 1, got {fn.concurrency!r}")
    bad_env = {
        k: v for k, v in fn.environment.items() if not isinstance(k, str) or not isinstance(v, str)
    }
    if bad_env:
        raise DeploymentRejected(f"{fn.id}: environment must map str to str, got {bad_env!r}")
    common: dict[str, Any] = {
        "function_id": fn.id,
        "memory_mb": fn.memory_mb,
        "timeout_s": float(fn.timeout_seconds),
        "concurrency": fn.concurrency,
        "environment": dict(fn.environment),
        "version": fn.version,
    }
    if isinstance(fn.handler, PackagedHandler):
        return FunctionConfig(
            kind="package", path=fn.handler.path, entrypoint=fn.handler.entrypoint, **common
        )
    if not callable(fn.handler):
        raise DeploymentRejected(f"{fn.id}: handler is not callable: {fn.handler!r}")
    import cloudpickle

    try:
        blob = cloudpickle.dumps(fn.handler)
    except Exception as exc:
        raise DeploymentRejected(f"{fn.id}: handler cannot be shipped to a worker: {exc}") from exc
    return FunctionConfig(kind="pickle", handler_blob=blob, **common)


class EdgeRuntime:
    """Runtime for edge function execution on one node.

    ``invoke`` is safe to call from many threads. Use ``close()`` (or ``with``) to stop every
    worker; a runtime that is garbage-collected closes its pool too.
    """

    def __init__(
        self,
        node: EdgeNode,
        *,
        max_workers: int | None = None,
        prestart: int = 1,
        max_queue: int = 64,
        max_invocations: int = 10_000,
        worker_user: str | None = None,
        limits: WorkerLimits | None = None,
        metrics: EdgeMetrics | None = None,
        codec: str = "pickle",
        pool: WorkerPool | None = None,
        synchronizer: EdgeSynchronizer | None = None,
    ) -> None:
        self.node = node
        #: Backs ``context.state`` for handlers that take a ``context`` parameter; their
        #: writes become new versions here when the invocation succeeds.
        self.synchronizer = synchronizer or EdgeSynchronizer()
        self.metrics = metrics or EdgeMetrics()
        self._functions: dict[str, EdgeFunction] = {}
        # uuid4() per call costs ~5 us; a random prefix and a counter are as unique.
        self._request_prefix = uuid.uuid4().hex[:16]
        self._request_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pool = pool or WorkerPool(
            max_workers=max_workers or max(4, 2 * (os.cpu_count() or 1)),
            prestart=prestart,
            max_queue=max_queue,
            max_invocations=max_invocations,
            codec=codec,
            user=worker_user,
            cwd=os.getcwd(),
            limits=limits,
            # Handlers defined in importable modules are pickled by reference.
            sys_path=[p for p in sys.path if p],
        )
        self._finalizer = weakref.finalize(self, self._pool.close)

    @property
    def pool(self) -> WorkerPool:
        return self._pool

    def deploy(self, function: EdgeFunction) -> None:
        """Deploy a function to edge (the same id replaces the previous one)."""
        config = function_config(function)
        self._pool.start()
        with self._lock:
            self._functions[function.id] = function
            self._pool.register(config)

    def undeploy(self, function_id: str) -> bool:
        """Undeploy a function; False when it was not deployed."""
        with self._lock:
            if self._functions.pop(function_id, None) is None:
                return False
            self._pool.unregister(function_id)
        return True

    def list_functions(self) -> list[EdgeFunction]:
        with self._lock:
            return list(self._functions.values())

    def invoke(self, function_id: str, *args: Any, **kwargs: Any) -> Any:
        """Invoke an edge function in a worker and return the handler's value."""
        return self.execute(function_id, args, kwargs).value

    def execute(
        self,
        function_id: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
    ) -> InvokeResult:
        """Like ``invoke`` but returns the whole result (cold start, duration, RSS)."""
        request_id = request_id or f"{self._request_prefix}-{next(self._request_ids):x}"
        started_wall = time.time()
        started = time.monotonic()
        try:
            result = self._pool.invoke(
                function_id,
                args,
                kwargs,
                request_id=request_id,
                context=self._context,  # read when a worker takes it, not now
                on_result=self._commit_state,  # before the worker serves the next one
            )
        except EdgeExecutionError as exc:
            if not isinstance(exc, FunctionNotFound):
                self.metrics.record(
                    InvocationRecord(
                        function_id=function_id,
                        node_id=self.node.id,
                        start_time=started_wall,
                        duration_ms=(time.monotonic() - started) * 1000,
                        success=False,
                        error=str(exc),
                        request_id=request_id,
                        error_type=exc.type,
                    )
                )
            raise
        self.metrics.record(
            success_record(
                function_id,
                self.node.id,
                started_wall,
                result.duration_ms,
                request_id,
                result.cold_start,
                result.rss_kb,
            )
        )
        return result

    def _context(self) -> ContextInput:
        version, data = self.synchronizer.context_input()
        return ContextInput(state_version=version, state=data)

    def _commit_state(self, result: InvokeResult) -> None:
        """Apply a successful handler's writes (StateConflict if what it read changed)."""
        if result.changes:
            self.synchronizer.apply_changes(
                result.changes,
                base_version=result.state_version,
                checked=result.checked,
                read_all=result.read_all,
            )

    def close(self) -> None:
        """Stop every worker and reap it; idempotent."""
        self._finalizer()

    def __enter__(self) -> EdgeRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
