"""Old home of the synced state's tables, now :mod:`agent.store.state` (no mixin).

Only re-exports, because :mod:`agent.edge.outbox` (owned elsewhere) still imports
``DELTA_KIND`` from here; the other names are the ones this module used to define, kept so
that nothing importing them breaks. New code imports from :mod:`agent.store.state` (or
:mod:`agent.store`); once no importer is left, delete this module.
"""

from agent.store.db import SYNC_SCHEMA
from agent.store.dedupe import ReplyRecord
from agent.store.state import (
    DELTA_KIND,
    SNAPSHOT_OVERHEAD,
    EncodeDelta,
    StateTooLarge,
    SyncCommit,
    SyncJob,
    effective_changes,
)

__all__ = [
    "DELTA_KIND",
    "SNAPSHOT_OVERHEAD",
    "SYNC_SCHEMA",
    "EncodeDelta",
    "ReplyRecord",
    "StateTooLarge",
    "SyncCommit",
    "SyncJob",
    "effective_changes",
]
