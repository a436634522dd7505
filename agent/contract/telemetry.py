"""What a node tells the fleet about itself: status, heartbeat, function state; and the roll call.

Owns the JSON of the retained ``status`` (also the Last Will), the periodic ``heartbeat``, the
retained per-function ``functions/<fid>/state``, and the fleet's ``rollcall`` that asks every
agent to answer with them. Decoders (the cloud side's) raise ``BadRequest``; encoders raise
``ValueError`` for a message outside the contract and ``TypeError`` for one that is not JSON.

Must never: do I/O, or import anything beyond the stdlib, ``agent.errors``, ``agent.models``
and ``agent.contract``'s pure modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from agent.contract.fields import (
    ErrorType,
    Fields,
    decode_message,
    dumps,
    encode_message,
    load_object,
    now_ts,
    request_id_field,
    shallow_copy,
    string_list,
)
from agent.errors import BadRequest
from agent.models import EdgeNodeStatus

NODE_STATUSES: Final = frozenset(s.value for s in EdgeNodeStatus)
FUNCTION_STATES: Final = frozenset({"active", "failed", "rejected", "removed"})

#: The longest answer window a roll call may ask for (seconds); longer ones are clamped.
MAX_ROLLCALL_WINDOW_S: Final = 300.0


def _check_status(msg: Mapping[str, Any], err: ErrorType) -> None:
    f = Fields(msg, "status", err)
    f.id("node_id")
    f.choice("status", NODE_STATUSES)
    f.ts()
    f.text("agent_version")
    f.text("name")
    f.text("location")
    string_list(f, "capabilities", f.array("capabilities"))


_SYSTEM_FIELDS: Final = (
    "cpu_percent",
    "memory_used_mb",
    "memory_total_mb",
    "disk_free_mb",
    "load_1m",
)
_FUNCTION_COUNTERS: Final = ("invocations", "errors", "timeouts")


def _check_heartbeat(msg: Mapping[str, Any], err: ErrorType) -> None:
    f = Fields(msg, "heartbeat", err)
    f.id("node_id")
    f.integer("seq")
    f.ts()
    f.number("uptime_s")
    f.choice("status", NODE_STATUSES)
    system = f.child("system", f.obj("system"))
    for key in _SYSTEM_FIELDS:
        system.number(key)
    for i, entry in enumerate(f.array("functions")):
        if not isinstance(entry, dict):
            f.bad(f"functions[{i}]", "an object", entry)
        fn = f.child(f"functions[{i}]", entry)
        fn.id("id")
        fn.text("version")
        if not fn.text("state"):
            fn.bad("state", "a non-empty string", "")
        for key in _FUNCTION_COUNTERS:
            fn.integer(key)
        for key in ("p50_ms", "p95_ms"):
            if fn.raw(key) is not None:  # null until the function has been invoked
                fn.number(key)


def _check_function_state(msg: Mapping[str, Any], err: ErrorType) -> None:
    f = Fields(msg, "function state", err)
    f.id("function_id")
    state = f.choice("state", FUNCTION_STATES)
    if state in ("active", "failed"):  # a rejected or never-deployed spec may lack both
        f.text("version")
        f.hex64("sha256")
    else:
        f.nullable_text("version", "a string or null")
        if f.raw("sha256") is not None:
            f.hex64("sha256")
    if state in ("failed", "rejected") or f.raw("error") is not None:
        f.error()  # required when failed or rejected, optional otherwise
    f.ts()


def encode_status(
    node_id: str,
    status: str | EdgeNodeStatus,
    *,
    agent_version: str,
    name: str,
    location: str,
    capabilities: Iterable[str],
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """The retained status message (also the Last Will, with status ``offline``)."""
    msg: dict[str, Any] = {
        "node_id": node_id,
        "status": status.value if isinstance(status, EdgeNodeStatus) else status,
        "ts": now_ts(),
        "agent_version": agent_version,
        "name": name,
        "location": location,
        "capabilities": list(capabilities),
    }
    return encode_message(msg, extra, _check_status)


def encode_heartbeat(
    node_id: str,
    seq: int,
    uptime_s: float,
    status: str | EdgeNodeStatus,
    system: Mapping[str, Any],
    functions: Iterable[Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """A heartbeat; ``system`` and each ``functions`` entry may carry extra keys."""
    msg: dict[str, Any] = {
        "node_id": node_id,
        "seq": seq,
        "ts": now_ts(),
        "uptime_s": uptime_s,
        "status": status.value if isinstance(status, EdgeNodeStatus) else status,
        "system": shallow_copy(system),
        "functions": [shallow_copy(entry) for entry in functions],
    }
    return encode_message(msg, extra, _check_heartbeat)


def encode_function_state(
    function_id: str,
    version: str | None,
    sha256: str | None,
    state: str,
    error: Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """The retained state of one function here; ``error`` is required when failed/rejected."""
    msg: dict[str, Any] = {
        "function_id": function_id,
        "version": version,
        "sha256": sha256,
        "state": state,
        "error": shallow_copy(error),
        "ts": now_ts(),
    }
    return encode_message(msg, extra, _check_function_state)


def decode_status(payload: bytes) -> dict[str, Any]:
    """A validated status message (cloud side)."""
    return decode_message(payload, "status", _check_status)


def decode_heartbeat(payload: bytes) -> dict[str, Any]:
    """A validated heartbeat (cloud side)."""
    return decode_message(payload, "heartbeat", _check_heartbeat)


def decode_function_state(payload: bytes) -> dict[str, Any]:
    """A validated function state message (cloud side)."""
    return decode_message(payload, "function state", _check_function_state)


def encode_rollcall(request_id: str, window_s: float) -> bytes:
    """A roll call: every agent answers within ``window_s`` (at a random moment in it)."""
    msg = {"request_id": request_id, "window_s": window_s}
    _check_rollcall(msg, ValueError)
    return dumps(msg)


def decode_rollcall(payload: bytes) -> tuple[str, float]:
    """``(request_id, window_s)`` of a roll call, the window clamped to
    ``MAX_ROLLCALL_WINDOW_S``."""
    msg = load_object(payload, "roll call", BadRequest)
    _check_rollcall(msg, BadRequest)
    return msg["request_id"], min(float(msg["window_s"]), MAX_ROLLCALL_WINDOW_S)


def _check_rollcall(msg: Mapping[str, Any], err: ErrorType) -> None:
    f = Fields(msg, "roll call", err)
    request_id_field(f)
    f.number("window_s")
