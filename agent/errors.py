"""The one exception tree of edge-agent.

Classified by what the caller should do::

    AgentError                      base of everything the agent raises on purpose
    ├── ConfigError (ValueError)    fix the config file; the CLI exits 78 (EX_CONFIG)
    ├── StoreError                  local state could not be read or written (disk full,
    │   │                           corrupt db): the agent degrades and retries
    │   └── StateTooLarge           (agent.store) a state document over its bound
    ├── OutboxFull                  (agent.store) backpressure, not a fault: the outbox is
    │                               at its bound, nothing written; answer without it or
    │                               retry later (new invocations get ``overloaded``)
    ├── DeploymentRejected          the spec or bundle is bad: report, keep the old version
    │                               wire type ``deployment_rejected``
    ├── MqttError                   ``mqtt_error`` (agent.mqtt): a publish or subscribe
    │                               could not be handed to paho (not connected, queue full)
    ├── BrokerUnreachable           ``broker_unreachable`` (agent.cloud): the cloud side
    │   │                           could not reach the broker, or it did not answer in time
    │   └── PublishRefused          ``publish_refused``: the broker refused a publish
    │                               (MQTT 5 PUBACK reason >= 0x80)
    └── EdgeExecutionError          one invocation failed; the agent keeps running
        ├── FunctionTimeout (TimeoutError)       ``timeout``: killed at the deadline
        │   └── ReplyTimeout                     (agent.cloud) no reply from the node in time
        ├── MemoryLimitExceeded (MemoryError)    ``memory_exceeded``: hit its memory_mb
        ├── HandlerError                         ``handler_error``: the handler raised
        ├── WorkerCrashed                        ``worker_crashed``: the worker died
        ├── FunctionNotFound (ValueError)        ``function_not_found``
        ├── BadRequest (ValueError)              ``bad_request``: malformed input
        │   └── InvokeDecodeError                (agent.contract.protocol) an invocation that could
        │                                        not be decoded, with what was salvaged
        │                                        for the error reply
        ├── Overloaded                           ``overloaded``: queue full, retry later
        └── StateConflict                        ``conflict``: synced state changed under
                                                 it; nothing written, retry

Every class is defined here except ``StateTooLarge``, which lives in ``agent.store``; the
others stay importable from where they are raised (``agent.store``, ``agent.mqtt``,
``agent.cloud``, ``agent.contract.protocol``). ``OutboxFull`` is ordinary backpressure, so it
is not a ``StoreError``: ``except StoreError`` means a fault of the store (the agent
degrades), and a full outbox is caught by name where it can happen (the store raises it only
from the calls that queue a message: ``outbox_put``, ``record_reply``, ``sync_commit``).

Errors cross process boundaries and the wire as ``{"type": ..., "message": ...}``
(:func:`error_to_dict` / :func:`error_from_dict`); the ``type`` strings are part of the
fixed wire contract. Only the classes in :data:`ERROR_TYPES` travel as themselves; any other
becomes a ``handler_error`` on the wire. This module is pure: the worker imports it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AgentError(Exception):
    """Base class of every error edge-agent raises on purpose."""

    type: ClassVar[str] = "agent_error"


class ConfigError(AgentError, ValueError):
    """The configuration is invalid; the message names the dotted key and the bad value."""

    type = "config_error"


class StoreError(AgentError):
    """The local state database could not be read or written."""

    type = "store_error"


class OutboxFull(AgentError):
    """The outbox is at its message or byte bound; nothing was added and nothing dropped.

    Backpressure, not a fault of the store (so not a StoreError): refuse new work with
    ``overloaded``, or answer without the outbox, and retry once the broker drained it.
    ``depth`` is the (messages, payload bytes) queued when it was refused.
    """

    type = "outbox_full"

    def __init__(self, message: str, *, depth: tuple[int, int]) -> None:
        super().__init__(message)
        self.depth = depth


class DeploymentRejected(AgentError):
    """A function spec or its code bundle was refused (bad digest, bad zip, bad entrypoint)."""

    type = "deployment_rejected"


class EdgeExecutionError(AgentError):
    """Error during edge function execution (the seed's name, kept).

    Subclasses say why; ``type`` is the wire name of the reason.
    """

    type = "handler_error"


class FunctionTimeout(EdgeExecutionError, TimeoutError):
    """The invocation ran past ``timeout_seconds``; its worker was killed."""

    type = "timeout"


class MemoryLimitExceeded(EdgeExecutionError, MemoryError):
    """The handler needed more than ``memory_mb``; its worker was replaced."""

    type = "memory_exceeded"


class HandlerError(EdgeExecutionError):
    """The handler raised an exception (chained as ``__cause__`` where it can be rebuilt)."""

    type = "handler_error"


class WorkerCrashed(EdgeExecutionError):
    """The worker process died during the invocation (exit code or signal in the message)."""

    type = "worker_crashed"

    def __init__(
        self, message: str, *, exit_code: int | None = None, signal: int | None = None
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.signal = signal


class FunctionNotFound(EdgeExecutionError, ValueError):
    """No function with that id is deployed ("Function not found", as the seed said)."""

    type = "function_not_found"


class BadRequest(EdgeExecutionError, ValueError):
    """The request could not be parsed or failed validation."""

    type = "bad_request"


class Overloaded(EdgeExecutionError):
    """Too many invocations are queued; the caller should retry later."""

    type = "overloaded"


class StateConflict(EdgeExecutionError):
    """Keys the invocation read or wrote were changed by another invocation since it started.

    The handler ran, but none of its writes were applied and it is not re-run behind the
    caller's back (handlers have side effects): the caller may retry. ``keys`` names them
    (``["*"]`` when the handler read the whole document).
    """

    type = "conflict"

    def __init__(self, message: str, *, keys: list[str] | None = None) -> None:
        super().__init__(message)
        self.keys = list(keys or [])


class InvokeDecodeError(BadRequest):
    """An invocation that could not be decoded, with what was salvaged for the error reply.

    Raised by ``agent.contract.protocol.decode_invoke``; on the wire it is a ``bad_request``.
    """

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        function_id: str | None = None,
        reply_to: str | None = None,
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.function_id = function_id
        self.reply_to = reply_to


class MqttError(AgentError):
    """A publish or subscribe could not be handed to paho (not connected, queue full).

    Raised by ``agent.mqtt.MqttClient``.
    """

    type = "mqtt_error"


class BrokerUnreachable(AgentError):
    """The broker could not be reached, refused us, or did not acknowledge in time.

    Raised by the cloud side (``agent.cloud.FleetController``, ``EdgeCluster``, edgectl).
    """

    type = "broker_unreachable"


class PublishRefused(BrokerUnreachable):
    """The broker acknowledged a publish with a failure reason (MQTT 5 PUBACK >= 0x80)."""

    type = "publish_refused"


class ReplyTimeout(FunctionTimeout):
    """No reply arrived from the node within the deadline (a ``FunctionTimeout`` too)."""


#: Wire ``type`` -> exception class: the contract's eight names plus ``conflict``.
ERROR_TYPES: dict[str, type[AgentError]] = {
    cls.type: cls
    for cls in (
        FunctionTimeout,
        MemoryLimitExceeded,
        HandlerError,
        WorkerCrashed,
        FunctionNotFound,
        BadRequest,
        Overloaded,
        DeploymentRejected,
        StateConflict,
    )
}


def error_to_dict(exc: BaseException) -> dict[str, Any]:
    """The wire form ``{type, message}`` of an exception; unknown ones are handler errors.

    A conflict also carries ``keys`` (an additive field: readers may ignore it).
    """
    kind = exc.type if isinstance(exc, AgentError) and exc.type in ERROR_TYPES else None
    out: dict[str, Any] = {
        "type": kind or HandlerError.type,
        "message": str(exc) or exc.__class__.__name__,
    }
    if isinstance(exc, StateConflict):
        out["keys"] = list(exc.keys)
    return out


def error_from_dict(data: Any) -> AgentError:
    """Rebuild an exception from its wire form; anything malformed becomes a HandlerError."""
    if not isinstance(data, dict):
        return HandlerError(f"malformed error: {data!r}")
    cls = ERROR_TYPES.get(str(data.get("type")), HandlerError)
    message = str(data.get("message", ""))
    if cls is StateConflict:
        keys = data.get("keys")
        return StateConflict(message, keys=[str(k) for k in keys] if isinstance(keys, list) else [])
    return cls(message)
