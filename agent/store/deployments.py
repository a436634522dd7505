"""What is deployed: the ``deployment`` rows (what the cloud asked for and what is on disk)
and the ``spec_source`` rows (the spec each scope asked for, fleet or node).

Owns those two tables, and reading the deployment rows back out of a damaged database that
was moved aside (:func:`salvage_deployments`). Runs its SQL through
:class:`~agent.store.db.Database`.

Must never: decide what to deploy or trust a salvaged row (:mod:`agent.edge.deploy_reconcile`
does both), or let a sqlite3 object or exception escape.
"""

from __future__ import annotations

import sqlite3
from contextlib import suppress
from dataclasses import dataclass, fields
from pathlib import Path

from agent.store.db import Database

__all__ = ["SPEC_SCOPES", "DeploymentRow", "Deployments", "salvage_deployments"]

#: Who can ask for a function: the whole fleet, or this node only (which wins).
SPEC_SCOPES = ("fleet", "node")


@dataclass(frozen=True)
class DeploymentRow:
    """What is deployed for one function; ``active_*`` keeps serving when a newer one failed."""

    function_id: str
    version: str
    sha256: str
    fingerprint: str
    spec_json: str
    code_dir: str
    state: str
    error_json: str | None
    active_version: str | None
    active_code_dir: str | None
    active_spec_json: str | None
    updated_ts: float


_DEPLOYMENT_COLUMNS = tuple(f.name for f in fields(DeploymentRow))
_DEPLOYMENT_SELECT = f"SELECT {', '.join(_DEPLOYMENT_COLUMNS)} FROM deployment"
_DEPLOYMENT_UPSERT = (
    f"INSERT INTO deployment ({', '.join(_DEPLOYMENT_COLUMNS)})"
    f" VALUES ({', '.join('?' for _ in _DEPLOYMENT_COLUMNS)})"
    " ON CONFLICT (function_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _DEPLOYMENT_COLUMNS[1:])
)


class Deployments:
    """The deployment and spec-source tables of a :class:`~agent.store.db.Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- spec sources ------------------------------------------------------------------

    def put_spec_source(self, scope: str, function_id: str, spec_json: str | None) -> None:
        """Remember the spec ``scope`` ("fleet" or "node") asked for; None = it removed it."""
        if scope not in SPEC_SCOPES:
            raise ValueError(f'scope must be "fleet" or "node", got {scope!r}')
        if spec_json is None:
            self._db.write(
                "put_spec_source",
                "DELETE FROM spec_source WHERE function_id = ? AND scope = ?",
                (function_id, scope),
            )
        else:
            self._db.write(
                "put_spec_source",
                "INSERT INTO spec_source (function_id, scope, spec_json) VALUES (?, ?, ?)"
                " ON CONFLICT (function_id, scope) DO UPDATE SET spec_json = excluded.spec_json",
                (function_id, scope, spec_json),
            )

    def get_spec_sources(self) -> dict[str, dict[str, str]]:
        """Every remembered spec: function id -> {scope: spec_json}."""
        rows = self._db.read(
            "get_spec_sources",
            "SELECT function_id, scope, spec_json FROM spec_source ORDER BY function_id, scope",
        )
        sources: dict[str, dict[str, str]] = {}
        for function_id, scope, spec_json in rows:
            sources.setdefault(function_id, {})[scope] = spec_json
        return sources

    # -- deployments -------------------------------------------------------------------

    def put(self, row: DeploymentRow) -> None:
        """Insert or replace the deployment of ``row.function_id``."""
        params = tuple(getattr(row, c) for c in _DEPLOYMENT_COLUMNS)
        self._db.write("put_deployment", _DEPLOYMENT_UPSERT, params)

    def get(self, function_id: str) -> DeploymentRow | None:
        """The deployment of ``function_id``, or None."""
        rows = self._db.read(
            "get_deployment", f"{_DEPLOYMENT_SELECT} WHERE function_id = ?", (function_id,)
        )
        return DeploymentRow(*rows[0]) if rows else None

    def list_all(self) -> list[DeploymentRow]:
        """Every deployment, by function id."""
        rows = self._db.read("list_deployments", f"{_DEPLOYMENT_SELECT} ORDER BY function_id")
        return [DeploymentRow(*r) for r in rows]

    def delete(self, function_id: str) -> bool:
        """Forget the deployment of ``function_id``; False if there was none."""
        changed = self._db.write(
            "delete_deployment", "DELETE FROM deployment WHERE function_id = ?", (function_id,)
        )
        return changed > 0


def salvage_deployments(path: str | Path) -> list[DeploymentRow]:
    """Best effort, read-only: the deployment rows a damaged database moved aside by
    :meth:`Store.open` still yields, up to the first unreadable page; never raises. Nothing
    here is trusted: the caller keeps only what it can verify."""
    rows: list[DeploymentRow] = []
    for uri in (f"file:{path}?mode=ro", f"file:{path}?immutable=1"):
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            cursor = conn.execute(_DEPLOYMENT_SELECT)
            while (raw := cursor.fetchone()) is not None:
                with suppress(TypeError, ValueError):
                    rows.append(DeploymentRow(*raw))
            return rows
        except sqlite3.Error:
            if rows:
                return rows
        finally:
            if conn is not None:
                conn.close()
    return rows
