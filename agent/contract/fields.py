"""The JSON plumbing every message of the wire contract shares. Internal to :mod:`agent.contract`.

Owns how a payload becomes a JSON object (:func:`load_object`: UTF-8, no NaN, an object or
the caller's error naming the message), how a message becomes bytes (:func:`dumps`), the
typed field reads whose every error names the message, the field and the (truncated) value
(:class:`Fields`), the ``ts`` timestamps (:func:`now_ts`, :func:`parse_ts`), and the
check-then-encode / decode-then-check steps the message modules build on
(:func:`encode_message`, :func:`decode_message`).

Only the message modules (topics, spec, invoke, telemetry, sync, indexes) use these names;
:mod:`agent.contract.protocol` re-exports ``now_ts`` and ``parse_ts`` and nothing else of it.

Must never: do I/O, import anything beyond the stdlib and the pure ``agent.errors`` /
``agent.contract.ids``, or read any clock but ``time.time()`` (and that only for ``ts``).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, NoReturn

from agent.contract.ids import (
    HEX64_RE,
    ID_RE,
    MAX_REQUEST_ID_CHARS,
    is_valid_id,
    is_valid_prefix,
    is_valid_request_id,
)
from agent.errors import ERROR_TYPES, BadRequest

#: The error a decoder raises (BadRequest, DeploymentRejected, ...) or ValueError in encoders.
ErrorType = type[Exception]

TS_RE = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$"
)


def now_ts(t: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds and ``Z`` from ``t`` or ``time.time()``.

    The same text as ``datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")``
    (microseconds rounded half-even, then truncated to milliseconds), with the part up to
    the second formatted once per second: every reply carries one (issue 15).
    """
    if t is None:
        t = time.time()
    frac, whole = math.modf(t)
    micros = round(frac * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    cached_second, prefix = _ts_second
    if cached_second != second:
        when = datetime.fromtimestamp(second, UTC)
        prefix = when.isoformat(timespec="seconds").removesuffix("+00:00")
        _set_ts_second(second, prefix)
    return f"{prefix}.{micros // 1000:03d}Z"


#: (second, its RFC 3339 text up to the seconds) of the last :func:`now_ts`.
_ts_second: tuple[int, str] = (-(2**62), "")


def _set_ts_second(second: int, prefix: str) -> None:
    global _ts_second
    _ts_second = (second, prefix)  # one assignment: a reader sees the old pair or the new


def parse_ts(s: str) -> datetime:
    """The aware datetime of an RFC 3339 ``ts``; ValueError when it is not one."""
    if not isinstance(s, str) or not TS_RE.fullmatch(s):
        raise ValueError(f"not an RFC 3339 timestamp: {show(s)}")
    return datetime.fromisoformat(s)  # also rejects month 13, hour 25, ...


def require_prefix(prefix: str) -> None:
    """ValueError unless ``prefix`` is a topic prefix (for constructors and encoders)."""
    if not is_valid_prefix(prefix):
        raise ValueError(
            f"topic prefix: expected non-empty levels without +, # or NUL, got {show(prefix)}"
        )


def require_id(kind: str, value: str) -> str:
    """``value``, or ValueError naming ``kind`` when it is not an id."""
    if not is_valid_id(value):
        raise ValueError(f"{kind}: expected an id matching {ID_RE.pattern}, got {show(value)}")
    return value


def show(value: Any, limit: int = 60) -> str:
    """A short, log-safe rendering of a bad value (JSON-like, truncated)."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]  # don't serialise megabytes only to cut them
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (ValueError, RecursionError):
        text = repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


#: Built once: ``json.loads`` with an option builds a decoder (and its scanner) per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def load_object(payload: bytes, what: str, err: ErrorType) -> dict[str, Any]:
    """Decode UTF-8 JSON that must be an object; everything else is ``err`` naming ``what``."""
    if not payload:
        raise err(f"{what}: payload is empty")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = bytes(payload[exc.start : exc.start + 4])
        raise err(f"{what}: payload is not UTF-8 (byte {exc.start}: {bad!r})") from exc
    try:
        if text.startswith("\ufeff"):  # what json.loads says (its decoder does not check)
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        obj = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise err(
            f"{what}: payload is not JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
        ) from exc
    except (ValueError, RecursionError) as exc:  # NaN, 5000-digit ints, [[[[...]]]]
        raise err(f"{what}: payload is not usable JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise err(f"{what}: expected a JSON object, got {show(obj)}")
    return obj


def dumps(msg: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; strings holding lone surrogates fall back to ``\\u`` escapes."""
    try:
        return json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except UnicodeEncodeError:
        return json.dumps(msg, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def shallow_copy(value: Any) -> Any:
    """A shallow copy of a mapping; anything else unchanged, for the checker to name."""
    return dict(value) if isinstance(value, Mapping) else value


def merge_extra(msg: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or key in msg:
            raise ValueError(f"extra field {key!r} is not a string or would overwrite a field")
        msg[key] = value
    return msg


class Fields:
    """Typed reads from one JSON object; every error names the message, the field and the value."""

    __slots__ = ("_err", "_obj", "_path", "_what")

    def __init__(self, obj: Mapping[str, Any], what: str, err: ErrorType, path: str = "") -> None:
        self._obj, self._what, self._err, self._path = obj, what, err, path

    def fail(self, key: str, problem: str) -> NoReturn:
        raise self._err(f"{self._what}: {self._path}{key}: {problem}")

    def bad(self, key: str, expected: str, value: Any) -> NoReturn:
        self.fail(key, f"expected {expected}, got {show(value)}")

    def raw(self, key: str) -> Any:
        if key not in self._obj:
            self.fail(key, "required field missing")
        return self._obj[key]

    def text(
        self, key: str, expected: str = "a string", pattern: re.Pattern[str] | None = None
    ) -> str:
        value = self.raw(key)
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            self.bad(key, expected, value)
        return value

    def choice(self, key: str, choices: Iterable[str]) -> str:
        """One of ``choices``; checked as a string first (a list is not hashable)."""
        value = self.raw(key)
        if not isinstance(value, str) or value not in choices:
            self.bad(key, f"one of {', '.join(sorted(choices))}", value)
        return value

    def nullable_text(
        self, key: str, expected: str, pattern: re.Pattern[str] | None = None
    ) -> str | None:
        return None if self.raw(key) is None else self.text(key, expected, pattern)

    def id(self, key: str) -> str:
        return self.text(key, f"an id matching {ID_RE.pattern}", ID_RE)

    def hex64(self, key: str) -> str:
        return self.text(key, "64 hex characters (a SHA-256)", HEX64_RE).lower()

    def ts(self, key: str = "ts") -> str:
        value = self.text(key, "an RFC 3339 timestamp", TS_RE)
        try:
            parse_ts(value)
        except ValueError:
            self.bad(key, "an RFC 3339 timestamp", value)
        return value

    def integer(self, key: str, minimum: int = 0) -> int:
        value = self.raw(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.bad(key, f"an integer >= {minimum}", value)
        return value

    def number(self, key: str, *, positive: bool = False) -> float:
        value = self.raw(key)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not (value > 0 if positive else value >= 0):
            self.bad(key, "a finite number > 0" if positive else "a finite number >= 0", value)
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            self.bad(key, "true or false", value)
        return value

    def obj(self, key: str, *, optional: bool = False) -> dict[str, Any]:
        value = self.raw(key) if not optional else self._obj.get(key)
        if optional and value is None:
            return {}
        if not isinstance(value, dict):
            self.bad(key, "an object", value)
        return value

    def array(self, key: str, *, optional: bool = False) -> list[Any]:
        value = self.raw(key) if not optional else self._obj.get(key)
        if optional and value is None:
            return []
        if not isinstance(value, list):
            self.bad(key, "a list", value)
        return value

    def child(self, key: str, obj: Mapping[str, Any]) -> Fields:
        return Fields(obj, self._what, self._err, f"{self._path}{key}.")

    def error(self, key: str = "error") -> dict[str, Any]:
        err = self.obj(key)
        sub = self.child(key, err)
        sub.choice("type", ERROR_TYPES)
        sub.text("message")
        return err


def request_id_field(f: Fields, key: str = "request_id") -> str:
    """The request id at ``key`` (1 to 128 printable characters)."""
    value = f.raw(key)
    if not is_valid_request_id(value):
        f.bad(key, f"1 to {MAX_REQUEST_ID_CHARS} printable characters", value)
    return value


def string_list(f: Fields, key: str, values: list[Any]) -> list[str]:
    """``values`` (the list at ``key``) when every item is a non-empty string."""
    for i, item in enumerate(values):
        if not isinstance(item, str) or not item:
            f.bad(f"{key}[{i}]", "a non-empty string", item)
    return values


def encode_message(
    msg: dict[str, Any],
    extra: Mapping[str, Any] | None,
    check: Callable[[Mapping[str, Any], ErrorType], None],
) -> bytes:
    """``msg`` with ``extra`` merged in, checked by ``check`` (ValueError), as JSON bytes;
    TypeError when a value is not JSON."""
    check(merge_extra(msg, extra), ValueError)
    try:
        return dumps(msg)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"message is not JSON-serialisable: {exc}") from exc


def decode_message(
    payload: bytes, what: str, check: Callable[[Mapping[str, Any], ErrorType], None]
) -> dict[str, Any]:
    """The JSON object of ``payload`` once ``check`` passed it; BadRequest otherwise."""
    msg = load_object(payload, what, BadRequest)
    check(msg, BadRequest)
    return msg
