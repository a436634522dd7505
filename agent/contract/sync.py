"""State sync on the wire: the delta, snapshot, desired and request messages, and the pure
delta algebra both ends use to build and replay them.

Owns the JSON of ``<p>/nodes/<node>/sync/{delta,snapshot,desired,request}`` (decoders raise
``BadRequest``, encoders ``ValueError``; a snapshot's and a desired state's checksum must
match their data), and :func:`compute_delta` / :func:`apply_delta`: a delta's ``changes`` map
changed top-level keys to their new value and deleted ones to ``None``. The seed's
synchronizer (:mod:`agent.local.synchronizer`) computes deltas with them and the cloud
(:mod:`agent.cloud.mirror`) replays them, so the cloud never imports the edge's storage.

Must never: do I/O, or import anything beyond the stdlib, ``agent.errors``, ``agent.models``
and ``agent.contract``'s pure modules (the cloud mirror imports this; it must not pull in
SQLite).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from agent.contract.fields import (
    ErrorType,
    Fields,
    decode_message,
    encode_message,
    now_ts,
    request_id_field,
    shallow_copy,
)
from agent.models import canonical_json, state_checksum

# --------------------------------------------------------------------------- delta algebra


def compute_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys that changed (to their new value) or were deleted (to ``None``).

    Values are compared as canonical JSON, not with ``==``: ``1 == True`` and ``1 == 1.0``
    in Python, but they are different documents with different checksums on the wire.
    """
    changes: dict[str, Any] = {
        k: copy.deepcopy(v)
        for k, v in after.items()
        if k not in before or canonical_json(before[k]) != canonical_json(v)
    }
    changes.update({k: None for k in before if k not in after})
    return changes


def apply_delta(state: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A new document: ``state`` with ``changes`` applied (``None`` deletes the key)."""
    result = copy.deepcopy(state)
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = copy.deepcopy(value)
    return result


# --------------------------------------------------------------------------- messages


def _checksum(f: Fields, data: Mapping[str, Any]) -> str:
    try:
        return state_checksum(data)
    except UnicodeEncodeError as exc:  # "\ud800" is valid JSON but has no UTF-8 to hash
        f.fail("data", f"holds a string that is not valid UTF-8 ({exc.reason})")


def _check_checksum(f: Fields, msg: Mapping[str, Any]) -> None:
    if f.hex64("checksum") != _checksum(f, msg["data"]):
        f.bad("checksum", "the SHA-256 of the canonical JSON of data", msg["checksum"])


def _check_sync_delta(msg: Mapping[str, Any], err: ErrorType) -> None:
    f = Fields(msg, "sync delta", err)
    start = f.integer("from_version")
    if f.integer("to_version") <= start:
        f.bad("to_version", f"an integer > from_version ({start})", msg["to_version"])
    f.obj("changes")
    f.hex64("checksum")


def _check_sync_snapshot(msg: Mapping[str, Any], err: ErrorType) -> None:
    f = Fields(msg, "sync snapshot", err)
    request_id_field(f)
    f.integer("version")
    f.obj("data")
    _check_checksum(f, msg)


def _check_sync_desired(msg: Mapping[str, Any], err: ErrorType) -> None:
    f = Fields(msg, "sync desired", err)
    f.integer("version")
    f.obj("data")
    if msg.get("checksum") is not None:  # optional; verified when the cloud sends it
        _check_checksum(f, msg)


def _check_sync_request(msg: Mapping[str, Any], err: ErrorType) -> None:
    f = Fields(msg, "sync request", err)
    request_id_field(f)


def encode_sync_delta(
    from_version: int,
    to_version: int,
    changes: Mapping[str, Any],
    checksum: str,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """A state change: ``changes`` maps keys to new values, None meaning deleted."""
    msg: dict[str, Any] = {
        "from_version": from_version,
        "to_version": to_version,
        "changes": shallow_copy(changes),
        "checksum": checksum,
        "ts": now_ts(),
    }
    return encode_message(msg, extra, _check_sync_delta)


def encode_sync_snapshot(
    request_id: str,
    version: int,
    data: Mapping[str, Any],
    checksum: str,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """The whole state, answering a sync request; ``checksum`` must match ``data``."""
    msg: dict[str, Any] = {
        "request_id": request_id,
        "version": version,
        "data": shallow_copy(data),
        "checksum": checksum,
        "ts": now_ts(),
    }
    return encode_message(msg, extra, _check_sync_snapshot)


def encode_sync_desired(version: int, data: Mapping[str, Any]) -> bytes:
    """The cloud side's desired state (retained), with its checksum."""
    msg: dict[str, Any] = {"version": version, "data": shallow_copy(data), "checksum": None}
    if isinstance(data, Mapping):
        msg["checksum"] = _checksum(Fields(msg, "sync desired", ValueError), data)
    return encode_message(msg, None, _check_sync_desired)


def encode_sync_request(request_id: str) -> bytes:
    """The cloud side's request for a snapshot."""
    return encode_message({"request_id": request_id}, None, _check_sync_request)


def decode_sync_desired(payload: bytes) -> tuple[int, dict[str, Any]]:
    """``(version, data)`` of a desired-state message."""
    msg = decode_message(payload, "sync desired", _check_sync_desired)
    return msg["version"], msg["data"]


def decode_sync_request(payload: bytes) -> str:
    """The ``request_id`` of a snapshot request."""
    request_id: str = decode_message(payload, "sync request", _check_sync_request)["request_id"]
    return request_id


def decode_sync_delta(payload: bytes) -> dict[str, Any]:
    """A validated delta (cloud side)."""
    return decode_message(payload, "sync delta", _check_sync_delta)


def decode_sync_snapshot(payload: bytes) -> dict[str, Any]:
    """A validated snapshot whose checksum matches its data (cloud side)."""
    return decode_message(payload, "sync snapshot", _check_sync_snapshot)
