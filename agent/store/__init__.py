"""The agent's durable state (SQLite); the only package that imports sqlite3.

:class:`Store` (``core``) composes the parts: ``db`` (connection, schema, migrations,
repair, meta), ``outbox`` (with dead letters), ``deployments`` (with spec sources),
``dedupe`` and ``state`` (the synced reported and desired state); ``accepted`` keeps the
invocations accepted and not yet answered. ``OutboxFull`` is defined in
:mod:`agent.errors` (backpressure, not a StoreError) and re-exported here."""

from agent.errors import OutboxFull
from agent.store.core import Store
from agent.store.db import MIGRATIONS
from agent.store.dedupe import DedupeEntry, ReplyRecord
from agent.store.deployments import SPEC_SCOPES, DeploymentRow
from agent.store.outbox import OutboxItem
from agent.store.state import StateTooLarge, SyncCommit, SyncJob, effective_changes

__all__ = [
    "MIGRATIONS",
    "SPEC_SCOPES",
    "DedupeEntry",
    "DeploymentRow",
    "OutboxFull",
    "OutboxItem",
    "ReplyRecord",
    "StateTooLarge",
    "Store",
    "SyncCommit",
    "SyncJob",
    "effective_changes",
]
