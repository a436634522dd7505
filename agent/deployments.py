"""Deployments on the loop side: what is wanted, what is deployed, and what to report.

The event loop calls this controller; the slow work (unpacking, test-loading) happens in
the :class:`~agent.deployer.Deployer` thread, whose outcomes come back through the loop.
It keeps the store's rows and the pool's registrations in step and reports each change on
the function's retained state topic through ``report`` (which queues it in the outbox).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from agent import bundles, protocol
from agent.deployer import Deployer, DeployJob, DeployOutcome, effective_spec, pool_config
from agent.errors import AgentError, error_to_dict
from agent.pool import WorkerPool
from agent.store import DeploymentRow, Store

log = logging.getLogger(__name__)

#: report(function_id, version, sha256, state, error, active_version)
Report = Callable[[str, str | None, str | None, str, dict[str, str] | None, str | None], None]


class DeploymentController:
    def __init__(
        self,
        store: Store,
        pool: WorkerPool,
        deployer: Deployer,
        capabilities: Iterable[str],
        report: Report,
        forget: Callable[[str], None] = lambda fid: None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.deployer = deployer
        self.capabilities = tuple(capabilities)
        self._report = report
        self._forget = forget
        #: function id -> fingerprint of the spec the deployer is preparing.
        self._pending_fingerprint: dict[str, str] = {}

    def restore(self) -> int:
        """Serve what was active before the restart, from disk; no broker needed."""
        restored = 0
        for row in self.store.list_deployments():
            if row.active_spec_json and row.active_code_dir and Path(row.active_code_dir).is_dir():
                spec = protocol.decode_spec(row.active_spec_json.encode())
                self.pool.register(pool_config(spec, Path(row.active_code_dir)))
                restored += 1
        return restored

    def on_spec(self, scope: str, fid: str, payload: bytes) -> None:
        """A retained spec (or its removal) arrived for ``scope``; store it, then reconcile."""
        if protocol.is_removal(payload):
            self.store.put_spec_source(scope, fid, None)
        else:
            try:
                spec = protocol.decode_spec(payload, expected_id=fid)
            except AgentError as exc:
                log.warning(
                    "rejected %s spec for %s: %s", scope, fid, exc, extra={"function_id": fid}
                )
                error = error_to_dict(exc)
                row = self.store.get_deployment(fid)
                if row is not None:
                    # Forget the fingerprint: re-publishing the spec that serves (a roll
                    # back) must run and report "active" again, not be a no-op.
                    self.store.put_deployment(
                        replace(
                            row,
                            fingerprint="",
                            state="rejected",
                            error_json=json.dumps(error),
                            updated_ts=time.time(),
                        )
                    )
                active = row.active_version if row is not None else None
                self._report(fid, None, None, "rejected", error, active)
                return
            self.store.put_spec_source(scope, fid, protocol.encode_spec(spec).decode())
        self.reconcile(fid)

    def reconcile_all(self) -> None:
        sources = self.store.get_spec_sources()
        for fid in set(sources) | {row.function_id for row in self.store.list_deployments()}:
            self.reconcile(fid, sources.get(fid, {}))

    def reconcile(self, fid: str, sources: dict[str, str] | None = None) -> None:
        """Bring one function to what its spec sources ask for."""
        if sources is None:
            sources = self.store.get_spec_sources().get(fid, {})
        wanted = effective_spec(sources)
        spec = protocol.decode_spec(wanted.encode()) if wanted else None
        if spec is not None and not protocol.requires_met(spec, self.capabilities):
            log.info("skipping %s: requires %s", fid, spec.requires, extra={"function_id": fid})
            spec = None
        row = self.store.get_deployment(fid)
        if spec is None:
            self._pending_fingerprint.pop(fid, None)
            if row is not None:
                self._remove(row)
            return
        fingerprint = protocol.spec_fingerprint(spec)
        if (row is not None and row.fingerprint == fingerprint) or (
            self._pending_fingerprint.get(fid) == fingerprint
        ):
            return  # re-delivery of what is deployed (or being deployed): a no-op
        self._pending_fingerprint[fid] = fingerprint
        log.info("deploying %s %s", fid, spec.version, extra={"function_id": fid})
        self.deployer.submit(DeployJob(spec, fingerprint))

    def _remove(self, row: DeploymentRow) -> None:
        fid = row.function_id
        self.pool.unregister(fid)
        self.store.delete_deployment(fid)
        self._forget(fid)
        bundles.remove_function(self.deployer.functions_dir, fid)
        log.info("removed %s", fid, extra={"function_id": fid})
        self._report(fid, row.active_version or row.version, row.sha256, "removed", None, None)

    def on_outcome(self, outcome: DeployOutcome) -> None:
        """The deployer finished preparing a spec: switch to it, or report why not."""
        spec = outcome.job.spec
        fid = spec.id
        if self._pending_fingerprint.get(fid) != outcome.job.fingerprint:
            if outcome.worker is not None:
                self.pool.discard(outcome.worker)
            return  # superseded by a newer spec (or removed) while it was being prepared
        del self._pending_fingerprint[fid]
        previous = self.store.get_deployment(fid)
        spec_json = protocol.encode_spec(spec).decode()
        row = DeploymentRow(
            function_id=fid,
            version=spec.version,
            sha256=spec.code.sha256,
            fingerprint=outcome.job.fingerprint,
            spec_json=spec_json,
            code_dir=str(outcome.code_dir or ""),
            state=outcome.state,
            error_json=json.dumps(outcome.error) if outcome.error else None,
            active_version=previous.active_version if previous else None,
            active_code_dir=previous.active_code_dir if previous else None,
            active_spec_json=previous.active_spec_json if previous else None,
            updated_ts=time.time(),
        )
        if outcome.state == "active" and outcome.code_dir is not None:
            self.pool.register(pool_config(spec, outcome.code_dir), preloaded=outcome.worker)
            row = replace(
                row,
                active_version=spec.version,
                active_code_dir=str(outcome.code_dir),
                active_spec_json=spec_json,
            )
            keep = {outcome.code_dir}
            if previous and previous.active_code_dir:
                keep.add(Path(previous.active_code_dir))
            self.store.put_deployment(row)
            bundles.prune_versions(self.deployer.functions_dir, fid, keep)
            log.info("%s %s is active", fid, spec.version, extra={"function_id": fid})
        else:
            self.store.put_deployment(row)
            log.warning(
                "%s %s %s: %s (still serving: %s)",
                fid,
                spec.version,
                outcome.state,
                (outcome.error or {}).get("message"),
                row.active_version,
                extra={"function_id": fid},
            )
        self._report(
            fid, spec.version, spec.code.sha256, outcome.state, outcome.error, row.active_version
        )
