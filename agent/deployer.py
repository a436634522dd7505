"""Deployments: from the cloud's retained specs to code that serves, never breaking what serves.

The event loop decides *what* should be deployed (:func:`effective_spec`: a node-scoped spec
overrides the fleet's); the :class:`Deployer` thread does the slow part of *how*, one job at
a time, off the loop: check limits, verify the sha256, unpack safely and atomically
(:mod:`agent.bundles`), then load the entrypoint in a throwaway worker. Only when all of that
succeeded does the loop switch the pool to the new version; otherwise the old one keeps
serving and the state topic says ``rejected`` (the spec or bundle is bad) or ``failed``
(the code did not load). This module never touches the store or MQTT.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent import bundles
from agent.config import RuntimeConfig
from agent.errors import DeploymentRejected, EdgeExecutionError, error_to_dict
from agent.isolation import FunctionIdentities
from agent.pool import FunctionConfig, Worker, WorkerPool
from agent.protocol import FunctionSpec, code_bytes

log = logging.getLogger(__name__)


def effective_spec(sources: Mapping[str, str]) -> str | None:
    """The spec JSON that applies to this node: the node's own wins over the fleet's."""
    return sources.get("node") or sources.get("fleet")


def check_limits(spec: FunctionSpec, runtime: RuntimeConfig) -> None:
    """Refuse specs that ask for more than this node grants ([runtime] caps)."""
    if spec.memory_mb > runtime.max_memory_mb:
        raise DeploymentRejected(
            f"function {spec.id}: memory_mb {spec.memory_mb} exceeds this node's "
            f"runtime.max_memory_mb {runtime.max_memory_mb}"
        )
    if spec.timeout_seconds > runtime.max_timeout_s:
        raise DeploymentRejected(
            f"function {spec.id}: timeout_seconds {spec.timeout_seconds:g} exceeds this node's "
            f"runtime.max_timeout_s {runtime.max_timeout_s:g}"
        )
    if spec.max_processes is not None and spec.max_processes > runtime.max_processes:
        raise DeploymentRejected(
            f"function {spec.id}: max_processes {spec.max_processes} exceeds this node's "
            f"runtime.max_processes {runtime.max_processes}"
        )
    if spec.concurrency > runtime.max_workers:
        raise DeploymentRejected(
            f"function {spec.id}: concurrency {spec.concurrency} exceeds this node's "
            f"runtime.max_workers {runtime.max_workers}"
        )


def pool_config(
    spec: FunctionSpec,
    code_dir: Path,
    identity: tuple[int, int] | None = None,
    max_processes: int = 0,
) -> FunctionConfig:
    """What the pool runs; ``identity`` is the function's own (uid, gid), if isolated, and
    ``max_processes`` the node's default for a spec that names none."""
    uid, gid = identity if identity is not None else (None, None)
    return FunctionConfig(
        function_id=spec.id,
        memory_mb=spec.memory_mb,
        timeout_s=float(spec.timeout_seconds),
        concurrency=spec.concurrency,
        environment=dict(spec.environment),
        kind="package",
        path=str(code_dir),
        entrypoint=spec.entrypoint,
        version=spec.version,
        uid=uid,
        gid=gid,
        max_processes=spec.max_processes or max_processes,
    )


@dataclass(frozen=True)
class DeployJob:
    spec: FunctionSpec
    fingerprint: str


@dataclass(frozen=True)
class DeployOutcome:
    job: DeployJob
    state: str  # active | rejected | failed
    code_dir: Path | None
    error: dict[str, str] | None
    #: The worker that test-loaded the code: the function's first warm worker.
    worker: Worker | None = None


class Deployer:
    """A background thread that prepares deployments one at a time. Starts on ``start()``."""

    def __init__(
        self,
        functions_dir: Path,
        pool: WorkerPool,
        runtime: RuntimeConfig,
        post: Callable[[DeployOutcome], None],
        identities: FunctionIdentities | None = None,
    ) -> None:
        self.functions_dir = functions_dir
        self.pool = pool
        self.identities = identities
        self.runtime = runtime
        self._post = post
        self._jobs: queue.SimpleQueue[DeployJob | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.functions_dir.mkdir(parents=True, exist_ok=True)
        bundles.cleanup_staging(self.functions_dir)
        self._thread = threading.Thread(target=self._run, name="edge-deployer", daemon=True)
        self._thread.start()

    def submit(self, job: DeployJob) -> None:
        self._jobs.put(job)

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout)
            self._thread = None

    def config_for(
        self, spec: FunctionSpec, code_dir: Path, *, grant: bool = True
    ) -> FunctionConfig:
        """The pool config for installed code, its files granted to the function's own uid
        (``grant=False``: already done, as for a version this thread just prepared).

        Raises DeploymentRejected (no uid left) and OSError (the files cannot be granted).
        """
        if self.identities is None:
            return pool_config(spec, code_dir)
        if grant:
            self.identities.grant(spec.id, code_dir)
        identity = self.identities.identity(spec.id)
        return pool_config(spec, code_dir, identity, self.runtime.max_processes)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._post(self.prepare(job))

    def prepare(self, job: DeployJob) -> DeployOutcome:
        """Install and test-load one spec; never raises."""
        spec = job.spec
        try:
            check_limits(spec, self.runtime)
            code_dir = bundles.install_bundle(
                self.functions_dir,
                spec.id,
                spec.version,
                spec.code.format,
                code_bytes(spec.code),
                spec.code.sha256,
                spec.entrypoint,
                max_bytes=self.runtime.max_bundle_bytes,
                max_files=self.runtime.max_bundle_files,
            )
        except DeploymentRejected as exc:
            return DeployOutcome(job, "rejected", None, error_to_dict(exc))
        except OSError as exc:
            error = {"type": "deployment_rejected", "message": f"cannot install bundle: {exc}"}
            return DeployOutcome(job, "failed", None, error)
        try:
            config = self.config_for(spec, code_dir)
        except DeploymentRejected as exc:
            return DeployOutcome(job, "rejected", code_dir, error_to_dict(exc))
        except OSError as exc:
            error = {"type": "deployment_rejected", "message": f"cannot grant {code_dir}: {exc}"}
            return DeployOutcome(job, "failed", code_dir, error)
        try:
            worker = self.pool.check_load(config)
        except EdgeExecutionError as exc:
            message = str(exc)
            log.warning("function %s %s does not load: %s", spec.id, spec.version, message)
            error = {"type": "deployment_rejected", "message": message}
            return DeployOutcome(job, "failed", code_dir, error)
        return DeployOutcome(job, "active", code_dir, None, worker)
