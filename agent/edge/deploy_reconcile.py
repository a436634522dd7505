"""Reconciling deployments, on the loop: what is wanted, what is deployed, what to report.

The event loop calls this controller; the slow work (unpacking, test-loading) happens in
the :class:`~agent.edge.deploy_prepare.Deployer` thread, whose outcomes come back through the loop.
It keeps the store's rows and the pool's registrations in step and reports each change on
the function's retained state topic through ``report`` (which queues it in the outbox).

Trust (:mod:`agent.trust`) is applied here, before a spec is stored: signature, key and
target by the :class:`~agent.trust.TrustPolicy`, and the replay guard, which needs the
store: a signed spec's ``sequence`` must be above the last one accepted for that function
on that scope (fleet or node), kept in the store's meta table under
``trust.sequence.<scope>.<fid>`` (no schema change; kept after a removal, so an old spec
cannot come back once its function was removed). Code runs only while its spec is still
trusted: checked again when it is restored at start (with its installed files compared to
the bundle in the stored spec), on SIGHUP, and whenever a stored spec is reconciled.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from agent.contract import protocol
from agent.edge.deploy_prepare import Deployer, DeployJob, DeployOutcome, effective_spec
from agent.errors import AgentError, DeploymentRejected, error_to_dict
from agent.exec import bundles
from agent.exec.pool import WorkerPool
from agent.store import DeploymentRow, Store
from agent.trust import TrustPolicy

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
        trust: TrustPolicy | None = None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.deployer = deployer
        self.capabilities = tuple(capabilities)
        self._report = report
        self._forget = forget
        #: Unsigned mode (accept everything) unless the daemon hands in its policy.
        self.trust = trust or TrustPolicy((), require_signed=False, node_id="")
        #: function id -> fingerprint of the spec the deployer is preparing.
        self._pending_fingerprint: dict[str, str] = {}

    @property
    def trust_mode(self) -> str:
        """``signed`` or ``unsigned``: what status and heartbeats say."""
        return self.trust.mode

    def restore(self) -> int:
        """Serve what was active before the restart, from disk; no broker needed.

        Only code whose spec is still trusted and whose installed files are exactly the
        bundle's (compared with the bundle kept in the stored spec) is served; anything
        else is reported (``rejected``: its key is no longer trusted; ``failed``: the files
        changed or are gone) and not run.
        """
        restored = 0
        for row in self.store.list_deployments():
            if not (row.active_spec_json and row.active_code_dir):
                continue
            spec = protocol.decode_spec(row.active_spec_json.encode())
            code_dir = Path(row.active_code_dir)
            untrusted = self.trust.still_trusted(spec)
            if untrusted is not None:
                self._stop_serving(row, "rejected", untrusted)
                continue
            problem = self._installed_problem(spec, code_dir)
            if problem is not None:
                self._stop_serving(row, "failed", f"{problem}: not run")
                continue
            try:
                config = self.deployer.config_for(spec, code_dir)
            except (DeploymentRejected, OSError) as exc:
                self._stop_serving(row, "failed", f"cannot run it as its own user: {exc}")
                continue
            self.pool.register(config)
            restored += 1
        return restored

    def salvage(self, rows: Iterable[DeploymentRow]) -> list[str]:
        """After a damaged store was replaced: keep what served before, from the rows the
        damaged file still yields, only where it can be verified: a spec signed by a key
        this node trusts (damaged pages cannot forge a signature) whose installed files are
        exactly its bundle. Its replay-guard sequence is restored with it. Everything else
        comes back when its retained spec arrives. Returns the function ids kept."""
        kept: list[str] = []
        functions_dir = self.deployer.functions_dir
        for row in rows:
            if not (row.active_spec_json and row.active_code_dir):
                continue
            try:
                spec = protocol.decode_spec(row.active_spec_json.encode())
                self.trust.verify_signature(spec)  # unsigned: cannot be verified, not kept
            except Exception as exc:  # damaged data: any decoding error means "not kept"
                log.info("not restoring %s from the damaged store: %s", row.function_id, exc)
                continue
            code_dir = Path(row.active_code_dir)
            if spec.id != row.function_id or code_dir.parent != functions_dir / spec.id:
                continue
            if spec.target not in (protocol.FLEET_TARGET, self.trust.node_id):
                continue  # signed for another node
            problem = self._installed_problem(spec, code_dir)
            if problem is not None:
                log.info("not restoring %s from the damaged store: %s", spec.id, problem)
                continue
            spec_json = protocol.encode_spec(spec).decode()
            # As if its spec had just arrived on the topic it was signed for; the broker's
            # retained spec (or its removal) supersedes it on subscribe as usual.
            scope = "fleet" if spec.target == protocol.FLEET_TARGET else "node"
            self.store.put_spec_source(scope, spec.id, spec_json)
            self.store.put_deployment(
                DeploymentRow(
                    function_id=spec.id,
                    version=spec.version,
                    sha256=spec.code.sha256,
                    fingerprint=protocol.spec_fingerprint(spec),
                    spec_json=spec_json,
                    code_dir=str(code_dir),
                    state="active",
                    error_json=None,
                    active_version=spec.version,
                    active_code_dir=str(code_dir),
                    active_spec_json=spec_json,
                    updated_ts=time.time(),
                )
            )
            if spec.sequence is not None:
                self.store.set_meta(_sequence_key(scope, spec.id), str(spec.sequence))
            kept.append(spec.id)
        return kept

    def _installed_problem(self, spec: protocol.FunctionSpec, code_dir: Path) -> str | None:
        """What differs between installed code and its spec's bundle (None: identical).

        Fetched code is compared with the copy kept at install; if that cannot be read,
        nothing matches and the code is not run."""
        try:
            raw = self.deployer.raw_code(spec)
        except (OSError, AgentError):
            raw = b""
        return bundles.verify_installed(
            code_dir,
            spec.code.format,
            raw,
            spec.entrypoint,
            max_bytes=self.deployer.runtime.max_bundle_bytes,
            max_files=self.deployer.runtime.max_bundle_files,
        )

    def set_trust(self, trust: TrustPolicy) -> None:
        """SIGHUP: a new policy. Functions whose spec it no longer trusts (a key removed, or
        unsigned code once signatures are required) stop serving and report ``rejected``."""
        self.trust = trust
        for row in self.store.list_deployments():
            if not row.active_spec_json:
                continue
            spec = protocol.decode_spec(row.active_spec_json.encode())
            problem = trust.still_trusted(spec)
            if problem is not None:
                self.pool.unregister(row.function_id)
                self._stop_serving(row, "rejected", problem)

    def _stop_serving(self, row: DeploymentRow, state: str, message: str) -> None:
        """Record that ``row``'s active code must not run, and report why."""
        fid = row.function_id
        log.error("%s %s: %s", fid, row.active_version, message, extra={"function_id": fid})
        error = {"type": "deployment_rejected", "message": message}
        self.store.put_deployment(
            replace(
                row,
                fingerprint="",  # a trusted spec arriving again deploys afresh
                state=state,
                error_json=json.dumps(error),
                active_version=None,
                active_code_dir=None,
                active_spec_json=None,
                updated_ts=time.time(),
            )
        )
        self._report(fid, row.active_version, row.sha256, state, error, None)

    def _check_sequence(self, scope: str, spec: protocol.FunctionSpec, sequence: int) -> None:
        """A signed spec's sequence must be above the last accepted on this scope; the same
        spec again (a retained re-delivery) is the one exception."""
        last = self.store.get_meta(_sequence_key(scope, spec.id))
        if last is None or sequence > int(last):
            return
        if sequence == int(last):
            stored = self.store.get_spec_sources().get(spec.id, {}).get(scope)
            if stored is not None and protocol.spec_fingerprint(
                protocol.decode_spec(stored.encode())
            ) == protocol.spec_fingerprint(spec):
                return
        raise DeploymentRejected(
            f'function spec "{spec.id}": sequence: {sequence} is not above {last}, the last '
            f"accepted on the {scope} topic (a replay or a downgrade; a rollback needs a "
            "new, higher sequence)"
        )

    def on_spec(self, scope: str, fid: str, payload: bytes) -> None:
        """A retained spec (or its removal) arrived for ``scope``; store it, then reconcile."""
        if protocol.is_removal(payload):
            self.store.put_spec_source(scope, fid, None)
        else:
            spec = None
            try:
                spec = protocol.decode_spec(payload, expected_id=fid)
                sequence = self.trust.check(spec, scope)
                if sequence is not None:
                    self._check_sequence(scope, spec, sequence)
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
                # A spec that parsed names its version, so a rollout can match the refusal.
                version = spec.version if spec is not None else None
                sha256 = spec.code.sha256 if spec is not None else None
                self._report(fid, version, sha256, "rejected", error, active)
                return
            self.store.put_spec_source(scope, fid, protocol.encode_spec(spec).decode())
            if sequence is not None:
                self.store.set_meta(_sequence_key(scope, fid), str(sequence))
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
        untrusted = self.trust.still_trusted(spec)
        if untrusted is not None:  # stored before its key was revoked
            self._pending_fingerprint.pop(fid, None)
            error = {"type": "deployment_rejected", "message": untrusted}
            log.warning("not deploying %s: %s", fid, untrusted, extra={"function_id": fid})
            active = row.active_version if row is not None else None
            self._report(fid, spec.version, spec.code.sha256, "rejected", error, active)
            return
        if row is None and fid not in self._pending_fingerprint:
            over = self._over_max_functions(fid)
            if over is not None:
                log.warning("not deploying %s: %s", fid, over, extra={"function_id": fid})
                error = {"type": "deployment_rejected", "message": over}
                self._report(fid, spec.version, spec.code.sha256, "rejected", error, None)
                return
        self._pending_fingerprint[fid] = fingerprint
        log.info("deploying %s %s", fid, spec.version, extra={"function_id": fid})
        keep = (Path(row.active_code_dir),) if row is not None and row.active_code_dir else ()
        self.deployer.submit(DeployJob(spec, fingerprint, keep))

    def _over_max_functions(self, fid: str) -> str | None:
        """Why a new function ``fid`` may not be deployed (runtime.max_functions), or None.

        Counts functions with a deployment row (serving, failed or rejected with a row)
        and those being prepared for the first time."""
        limit = self.deployer.runtime.max_functions
        known = {row.function_id for row in self.store.list_deployments()}
        known |= set(self._pending_fingerprint)
        if len(known) < limit:
            return None
        return (
            f"function {fid} would be function number {len(known) + 1} on this node, over "
            f"runtime.max_functions ({limit}); remove one first"
        )

    def _remove(self, row: DeploymentRow) -> None:
        fid = row.function_id
        self.pool.unregister(fid)
        self.store.delete_deployment(fid)
        self._forget(fid)
        bundles.remove_function(self.deployer.functions_dir, fid)
        log.info("removed %s", fid, extra={"function_id": fid})
        self._report(fid, row.active_version or row.version, row.sha256, "removed", None, None)
        self._retry_refused()

    def _retry_refused(self) -> None:
        """A function left: specs refused for runtime.max_functions may fit now."""
        rows = {row.function_id for row in self.store.list_deployments()}
        for fid, sources in self.store.get_spec_sources().items():
            if fid not in rows and fid not in self._pending_fingerprint:
                self.reconcile(fid, sources)

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
            # A disk that failed the install: no fingerprint, so the next reconcile retries.
            fingerprint="" if outcome.disk_error else outcome.job.fingerprint,
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
            config = self.deployer.config_for(spec, outcome.code_dir, grant=False)
            self.pool.register(config, preloaded=outcome.worker)
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


def _sequence_key(scope: str, fid: str) -> str:
    return f"trust.sequence.{scope}.{fid}"
