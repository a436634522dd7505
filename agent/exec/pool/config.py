"""What the pool is told and what it answers: per-function config, results, context input.

Plain data, shared by the pool's parts and its callers (the runtime and the daemon build
:class:`FunctionConfig`; :class:`InvokeResult` is what ``WorkerPool.invoke`` returns).

Never import the pool's moving parts from here, and never hold a process or a lock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FunctionConfig:
    """What the pool needs to run one function (the runtime and the daemon build these)."""

    function_id: str
    memory_mb: int
    timeout_s: float
    concurrency: int = 1
    environment: Mapping[str, str] = field(default_factory=dict)
    #: ``pickle``: ``handler_blob`` is a cloudpickled callable. ``package``: path + entrypoint.
    kind: str = "pickle"
    handler_blob: bytes = b""
    path: str = ""
    entrypoint: str = ""
    version: str = ""
    #: The function's own uid and gid (its workers take them before loading its code);
    #: None: the pool's ``user`` (or the agent's own).
    uid: int | None = None
    gid: int | None = None
    #: RLIMIT_NPROC of its uid (processes and threads of all its workers); 0: none. Only
    #: applied with a uid of its own: the kernel counts per user.
    max_processes: int = 0


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~3 us to build, per invocation
class InvokeResult:
    value: Any
    cold_start: bool
    duration_ms: float
    rss_kb: int
    worker_pid: int
    accepts_context: bool
    #: The handler's writes to the synced state (None deletes); apply them only on success.
    changes: dict[str, Any] | None = None
    #: The synced-state version the invocation's ``context`` was built from.
    state_version: int = 0
    #: Keys it read or wrote: none may have changed since ``state_version`` at commit.
    checked: list[str] | None = None
    #: It listed the whole document: any change since ``state_version`` conflicts.
    read_all: bool = False
    #: JSON codec: the worker's bytes of ``value``, checked to be one JSON value (UTF-8, no
    #: NaN or Infinity): the daemon frames them into the reply as they are. None with pickle.
    raw: bytes | None = None


@dataclass(frozen=True)
class ContextInput:
    """The synced state and desired state an invocation's ``context`` starts from.

    Immutable snapshots: the caller replaces them, never mutates them. A worker is sent a
    document only when its version differs from what that worker last received.
    """

    state_version: int = 0
    state: Mapping[str, Any] = field(default_factory=dict)
    desired_version: int = 0
    desired: Mapping[str, Any] = field(default_factory=dict)


EMPTY_CONTEXT = ContextInput()

#: Where an invocation's context comes from: a snapshot, or a function read at send time.
ContextSource = ContextInput | Callable[[], ContextInput] | None
#: Called with a successful result while its worker is still held (see ``invoke``).
OnResult = Callable[[InvokeResult], None]
