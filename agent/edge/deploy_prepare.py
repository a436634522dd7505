"""Preparing a deployment, off the loop: from a retained spec to code ready to serve.

The event loop decides *what* should be deployed (:func:`effective_spec`: a node-scoped spec
overrides the fleet's); the :class:`Deployer` threads do the slow part of *how*, off the
loop: check limits, verify the sha256, check the code quota, unpack safely and atomically
(:mod:`agent.exec.bundles`), then load the entrypoint in a throwaway worker. Only when all of that
succeeded does the loop switch the pool to the new version; otherwise the old one keeps
serving and the state topic says ``rejected`` (the spec or bundle is bad, or over a quota)
or ``failed`` (the code did not load within ``runtime.deploy_timeout_s``).

Scheduling: at most ``runtime.deploy_parallel`` jobs run at once and at most one per
function; a newer job for a function replaces its queued (not yet started) one. So one
function's hanging import delays nobody else, and two versions of one function never race
for its directory. Installs (quota check, unpack) take one lock between them, so the quota
is counted against a disk no other install is writing; test-loads run in parallel.

This module never touches the store or MQTT.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from agent.config import RuntimeConfig
from agent.contract.protocol import FunctionSpec, code_bytes
from agent.edge import fetch
from agent.edge.isolation import FunctionIdentities
from agent.errors import DeploymentRejected, EdgeExecutionError, FunctionTimeout, error_to_dict
from agent.exec import bundles
from agent.exec.pool import FunctionConfig, Worker, WorkerPool

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
    #: The function's installed code that must stay (the version serving now); every other
    #: version of it is pruned before the new one is counted against the quota.
    keep: tuple[Path, ...] = ()


@dataclass(frozen=True)
class DeployOutcome:
    job: DeployJob
    state: str  # active | rejected | failed
    code_dir: Path | None
    error: dict[str, str] | None
    #: The worker that test-loaded the code: the function's first warm worker.
    worker: Worker | None = None
    #: The local disk failed the install (full, I/O error): not the spec's fault, so it is
    #: tried again once the disk recovers (the daemon treats it as a store fault).
    disk_error: OSError | None = None


_MB = 1024 * 1024
#: What a full or failing disk raises: the install is tried again once it recovers.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


def _mb(n: int) -> str:
    return f"{n / _MB:.1f} MB"


class Deployer:
    """Threads that prepare deployments (see the module docstring). Start on ``start()``."""

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
        self._cond = threading.Condition()
        self._queued: dict[str, DeployJob] = {}  # function id -> its newest unstarted job
        self._order: deque[str] = deque()  # function ids with a queued job, oldest first
        self._running: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._busy: set[threading.Thread] = set()  # threads in a job
        self._idle = 0
        self._stopping = False
        self._started = False
        self._install_lock = threading.Lock()

    def start(self) -> None:
        self.functions_dir.mkdir(parents=True, exist_ok=True)
        bundles.cleanup_staging(self.functions_dir)
        with self._cond:
            self._started = True
            self._stopping = False
            self._spawn_if_needed()

    def submit(self, job: DeployJob) -> None:
        with self._cond:
            fid = job.spec.id
            if fid not in self._queued:
                self._order.append(fid)
            self._queued[fid] = job  # an older queued job of the function is superseded
            if self._started:
                self._spawn_if_needed()
            self._cond.notify()

    def busy(self) -> list[str]:
        """Function ids being prepared now."""
        with self._cond:
            return sorted(self._running)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._queued.clear()
            self._order.clear()
            self._cond.notify_all()
            # A thread in a job (a hanging test-load, say) ends when the pool closes and
            # kills its worker; its outcome then goes to a loop that no longer reads it.
            threads = [t for t in self._threads if t not in self._busy]
            self._threads = []
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _spawn_if_needed(self) -> None:
        """Caller holds the condition: one more thread if all are busy and the cap allows."""
        wanted = len(self._running) + len(self._queued)
        while (
            self._idle < len(self._queued)
            and len(self._threads) < self.runtime.deploy_parallel
            and len(self._threads) < wanted
        ):
            thread = threading.Thread(
                target=self._run, name=f"edge-deployer-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            self._idle += 1
            thread.start()

    def _next_job(self) -> DeployJob | None:
        """Block until a job of a function not being prepared is queued; None to stop."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if len(self._running) < self.runtime.deploy_parallel:
                    for fid in self._order:
                        if fid not in self._running:
                            self._order.remove(fid)
                            self._running.add(fid)
                            self._busy.add(threading.current_thread())
                            self._idle -= 1
                            return self._queued.pop(fid)
                self._cond.wait()

    def _run(self) -> None:
        while (job := self._next_job()) is not None:
            outcome: DeployOutcome | None = None
            try:
                outcome = self.prepare(job)
            except Exception:  # a bug must not take a deployer thread with it
                log.exception("preparing %s %s failed unexpectedly", job.spec.id, job.spec.version)
            finally:
                with self._cond:
                    self._running.discard(job.spec.id)
                    self._busy.discard(threading.current_thread())
                    self._idle += 1
                    self._cond.notify_all()
            if outcome is not None:
                self._post(outcome)

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

    # -- the code quota (runtime.max_code_mb) ------------------------------------------------

    def code_bytes_used(self, exclude: Path | None = None) -> int:
        """Bytes every installed version of every function takes on disk (``exclude``: but
        that one)."""
        total = 0
        for versions in bundles.installed_versions(self.functions_dir).values():
            total += sum(bundles.disk_bytes(v) for v in versions if v != exclude)
        return total

    def _check_space(self, spec: FunctionSpec, target: Path, estimate: int) -> None:
        limit = self.runtime.max_code_mb * _MB
        used = self.code_bytes_used(exclude=target)
        if used + estimate > limit:
            raise DeploymentRejected(
                f"function {spec.id} {spec.version}: its code takes up to {_mb(estimate)} "
                f"unpacked and installed code already takes {_mb(used)}: {_mb(used + estimate)} "
                f"would be over runtime.max_code_mb ({self.runtime.max_code_mb} MB)"
            )

    def _prune_superseded(self, job: DeployJob, target: Path) -> None:
        """Before counting the quota: drop this function's versions that nothing serves."""
        keep = {*job.keep, target}
        removed = bundles.prune_versions(self.functions_dir, job.spec.id, keep)
        if removed:
            log.info(
                "pruned %d superseded versions of %s before installing %s",
                len(removed),
                job.spec.id,
                job.spec.version,
                extra={"function_id": job.spec.id},
            )

    def raw_code(self, spec: FunctionSpec) -> bytes:
        """A spec's code bytes: inline, or by reference (``code.url``): fetched once into
        ``functions/.fetch/<sha256>`` with its size and SHA-256 checked while it streams, and
        kept there (digest checked again on every use), so restoring it after a restart
        needs no network. Raises DeploymentRejected (a bad reference) or FetchFailed."""
        if not spec.code.url:
            return code_bytes(spec.code)
        path = fetch.fetch_code(
            fetch.CodeRef(spec.code.url, spec.code.sha256, spec.code.size),
            self.functions_dir / ".fetch",
            max_bytes=self.runtime.max_bundle_bytes,
            allow_file=self.runtime.allow_file_code_urls,
        )
        return path.read_bytes()

    def _install(self, job: DeployJob) -> Path:
        """Quota, unpack, quota again with what it really takes; under the install lock."""
        spec = job.spec
        target = bundles.version_dir(self.functions_dir, spec.id, spec.version, spec.code.sha256)
        raw = self.raw_code(spec)  # a fetch can take a while: not under the lock
        with self._install_lock:
            self._prune_superseded(job, target)
            code_dir = bundles.install_bundle(
                self.functions_dir,
                spec.id,
                spec.version,
                spec.code.format,
                raw,
                spec.code.sha256,
                spec.entrypoint,
                max_bytes=self.runtime.max_bundle_bytes,
                max_files=self.runtime.max_bundle_files,
                check_space=lambda estimate: self._check_space(spec, target, estimate),
            )
            limit = self.runtime.max_code_mb * _MB
            used = self.code_bytes_used()
            if used > limit:
                if code_dir not in job.keep:
                    bundles.prune_versions(self.functions_dir, spec.id, set(job.keep))
                raise DeploymentRejected(
                    f"function {spec.id} {spec.version}: installed code would take "
                    f"{_mb(used)} on disk with it, over runtime.max_code_mb "
                    f"({self.runtime.max_code_mb} MB)"
                )
        return code_dir

    # -- one job ------------------------------------------------------------------------------

    def prepare(self, job: DeployJob) -> DeployOutcome:
        """Install and test-load one spec; never raises."""
        spec = job.spec
        try:
            check_limits(spec, self.runtime)
            code_dir = self._install(job)
        except DeploymentRejected as exc:
            return DeployOutcome(job, "rejected", None, error_to_dict(exc))
        except OSError as exc:
            error = {"type": "deployment_rejected", "message": f"cannot install bundle: {exc}"}
            disk = exc if exc.errno in _DISK_ERRNOS else None
            return DeployOutcome(job, "failed", None, error, disk_error=disk)
        try:
            config = self.config_for(spec, code_dir)
        except DeploymentRejected as exc:
            return DeployOutcome(job, "rejected", code_dir, error_to_dict(exc))
        except OSError as exc:
            error = {"type": "deployment_rejected", "message": f"cannot grant {code_dir}: {exc}"}
            return DeployOutcome(job, "failed", code_dir, error)
        # The test-load has its own deadline: a spec's timeout_seconds bounds invocations,
        # not how long an import may hold a deployer thread.
        deadline = self.runtime.deploy_timeout_s
        started = time.monotonic()
        try:
            worker = self.pool.check_load(replace(config, timeout_s=deadline))
        except EdgeExecutionError as exc:
            took = time.monotonic() - started
            message = str(exc)
            if isinstance(exc, FunctionTimeout):
                message = (
                    f"function {spec.id} {spec.version}: the test-load (importing "
                    f"{spec.entrypoint}) did not finish within runtime.deploy_timeout_s "
                    f"({deadline:g}s); killed after {took:.1f}s"
                )
            log.warning("function %s %s does not load: %s", spec.id, spec.version, message)
            error = {"type": "deployment_rejected", "message": message}
            return DeployOutcome(job, "failed", code_dir, error)
        return DeployOutcome(job, "active", code_dir, None, worker)
