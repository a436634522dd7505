"""The agent's durable state (SQLite). ``core``: outbox, deployments, dedupe, meta;
``sync``: the synced reported and desired state. The only package that imports sqlite3."""

from agent.store.core import (
    MIGRATIONS,
    SPEC_SCOPES,
    DedupeEntry,
    DeploymentRow,
    OutboxFull,
    OutboxItem,
    Store,
)
from agent.store.sync import ReplyRecord, StateTooLarge, SyncCommit, SyncJob, effective_changes

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
