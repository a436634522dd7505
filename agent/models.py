"""The seed's data model, kept name for name, plus what it lacked.

Pure: stdlib only, no I/O. The worker may import it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any


class EdgeNodeStatus(Enum):
    """Status of an edge node."""

    ONLINE = "online"
    OFFLINE = "offline"
    DEGRADED = "degraded"
    SYNCING = "syncing"


@dataclass
class EdgeNode:
    """An edge computing node."""

    id: str
    name: str
    location: str = ""
    status: EdgeNodeStatus = EdgeNodeStatus.ONLINE
    capabilities: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    last_heartbeat: datetime = field(default_factory=datetime.now)


@dataclass(frozen=True)
class PackagedHandler:
    """Handler code on disk: a directory or zip put on ``sys.path``, and ``module:attr``.

    Use it as :attr:`EdgeFunction.handler` for code that is not a Python callable in this
    process (the daemon's deployed bundles, or a package a user ships by path).
    """

    path: str
    entrypoint: str

    def __post_init__(self) -> None:
        module, sep, attr = self.entrypoint.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f'entrypoint must be "module:attr", got {self.entrypoint!r}')


@dataclass
class EdgeFunction:
    """A function deployable to edge.

    The seed's fields come first with the seed's defaults. ``handler`` is a callable (shipped
    to the worker by value with cloudpickle) or a :class:`PackagedHandler`.
    """

    id: str
    name: str
    handler: Callable[..., Any] | PackagedHandler
    memory_mb: int = 128
    timeout_seconds: float = 30
    environment: dict[str, str] = field(default_factory=dict)
    #: Max parallel invocations of this function, each in its own worker.
    concurrency: int = 1
    version: str = "1"
    #: Capabilities a node must have to run this function.
    requires: list[str] = field(default_factory=list)

    @classmethod
    def from_package(
        cls, id: str, name: str, path: str, entrypoint: str, **kwargs: Any
    ) -> EdgeFunction:
        """A function whose code is a directory or zip on disk with ``module:attr``."""
        return cls(id=id, name=name, handler=PackagedHandler(str(path), entrypoint), **kwargs)


def canonical_json(data: Any) -> bytes:
    """The canonical JSON bytes the wire contract hashes for state checksums."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def state_checksum(data: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of a whole state document."""
    return hashlib.sha256(canonical_json(dict(data))).hexdigest()


@dataclass
class SyncState:
    """State synchronization data: a versioned document with its checksum."""

    version: int
    data: dict[str, Any]
    checksum: str
    updated_at: datetime = field(default_factory=datetime.now)

    @classmethod
    def from_data(cls, data: dict[str, Any], version: int) -> SyncState:
        """A state holding a deep copy of ``data`` (the caller's dict is never aliased)."""
        owned = copy.deepcopy(data)
        return cls(version=version, data=owned, checksum=state_checksum(owned))

    def verify(self) -> bool:
        """True when ``checksum`` matches ``data``."""
        return self.checksum == state_checksum(self.data)
