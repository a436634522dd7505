"""One small converter/validator per config field type (as supervisor's ``datatypes.py`` has).

Owns every rule a single TOML value must follow: each converter takes the raw value and returns
the typed one, or raises :class:`Invalid` with the problem, the bad value and where inside it
(``[2]``); :func:`show` writes a value back as the operator wrote it, for the message. Also
owns :func:`split_broker`, the one parser of broker addresses (``edgectl --broker`` uses it).
The id, version and prefix rules themselves are :mod:`agent.contract.ids`'s.

Must never: know the schema (which key uses which converter is :mod:`.schema`'s), read files,
raise anything but :class:`Invalid` (or ``ValueError`` from :func:`split_broker`).
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

from agent.contract import ids
from agent.contract.ids import ID_PATTERN


def is_valid_id(value: object) -> bool:
    """True when ``value`` is a string that is a valid node or function id (``contract.ids``)."""
    return ids.is_valid_id(value)


# --- converters: each takes the raw TOML value and returns the typed one or raises Invalid


Convert = Callable[[Any], Any]


class Invalid(Exception):
    """A value broke its key's rule; ``at`` locates it inside the value (``[2]``)."""

    def __init__(self, problem: str, value: Any, at: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.value = value
        self.at = at


def show(value: Any) -> str:
    """A value as the operator wrote it in TOML, cut short when long."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, Mapping):
        text = "a table"
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(show(item) for item in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML true is not 1


def integer(minimum: int, maximum: int | None = None) -> Convert:
    """An integer in ``minimum..maximum`` (TOML integers only: no bools, no floats)."""
    if maximum is not None:
        want = f"expected an integer from {minimum} to {maximum}"
    elif minimum == 1:
        want = "expected a positive integer"
    else:
        want = f"expected an integer >= {minimum}"

    def convert(value: Any) -> int:
        if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
            raise Invalid(want, value)
        return int(value)

    return convert


def number(minimum: float = 0.0, *, exclusive: bool = False) -> Convert:
    """A finite number ``>= minimum`` (``> minimum`` when exclusive), as a float."""
    if minimum == 0:
        want = "expected a positive number" if exclusive else "expected a non-negative number"
    else:
        want = f"expected a number {'>' if exclusive else '>='} {minimum:g}"

    def convert(value: Any) -> float:
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
            raise Invalid(want, value)
        if value < minimum or (exclusive and value == minimum):
            raise Invalid(want, value)
        return float(value)

    return convert


def flag(value: Any) -> bool:
    """A TOML boolean; "yes", "true" and 1 are refused so typos cannot flip a switch."""
    if not isinstance(value, bool):
        raise Invalid("expected true or false", value)
    return value


def string(*, empty: bool = True, blanks: bool = True, noun: str = "string") -> Convert:
    """A string without control characters; optionally non-empty and without whitespace."""
    noun = noun if empty else f"non-empty {noun}"
    want = f"expected a {noun}" + ("" if blanks else " without whitespace")

    def convert(value: Any) -> str:
        if not isinstance(value, str) or (not empty and not value):
            raise Invalid(want, value)
        if not blanks and any(ch.isspace() for ch in value):
            raise Invalid(want, value)
        if any(unicodedata.category(ch) == "Cc" for ch in value):
            raise Invalid(f"expected a {noun} without control characters", value)
        return value

    return convert


def path(*, required: bool = False) -> Convert:
    """A file system path, kept as a string; empty means "not set" unless required."""
    return string(empty=not required, noun="path")


def identifier(value: Any) -> str:
    """A node or function id (:data:`ID_PATTERN`)."""
    if not is_valid_id(value):
        raise Invalid(f"expected an id of {ids.ID_RULE} ({ID_PATTERN})", value)
    return str(value)


#: A non-empty string without whitespace (a host name, a capability).
word = string(empty=False, blanks=False)


def string_list(value: Any) -> tuple[str, ...]:
    """A list of distinct non-empty strings without whitespace, kept as a tuple."""
    if not isinstance(value, list | tuple):
        raise Invalid("expected a list of strings", value)
    items: list[str] = []
    for index, item in enumerate(value):
        try:
            text = word(item)
        except Invalid as exc:
            raise Invalid(exc.problem, item, at=f"[{index}]") from None
        if text in items:
            raise Invalid("duplicate entry", item, at=f"[{index}]")
        items.append(text)
    return tuple(items)


def uid_range(value: Any) -> str:
    """``"FIRST-LAST"`` (uids, 1000 <= FIRST <= LAST < 2**31-1, at least 1), or ``""`` for none."""
    if value == "":
        return ""
    want = 'expected "FIRST-LAST" with 1000 <= FIRST <= LAST <= 2147483646, or ""'
    if not isinstance(value, str):
        raise Invalid(want, value)
    first, sep, last = value.partition("-")
    if not sep or not first.isdigit() or not last.isdigit():
        raise Invalid(want, value)
    low, high = int(first), int(last)
    if not 1000 <= low <= high <= 2147483646:
        raise Invalid(want, value)
    return f"{low}-{high}"


def choice(*options: str) -> Convert:
    """One of a few fixed strings, matched exactly."""
    shown = [json.dumps(option) for option in options]
    if len(shown) == 2:
        want = f"expected {shown[0]} or {shown[1]}"
    else:
        want = "expected one of " + ", ".join(shown)

    def convert(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise Invalid(want, value)
        return value

    return convert


_protocol_choice = choice("auto", "5", "3.1.1")


def protocol(value: Any) -> str:
    """The MQTT version, "auto", "5" or "3.1.1"; a bare TOML ``5`` means "5"."""
    if _is_int(value) and value == 5:
        return "5"
    return str(_protocol_choice(value))


def topic_prefix(value: Any) -> str:
    """The first topic level(s): usable as a literal prefix of every topic the agent uses."""
    problem = ids.prefix_problem(value)
    if problem is not None:
        raise Invalid(problem, value)
    return str(value)


def split_broker(value: str, default_port: int = 1883) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port); ValueError says what is wrong.

    The one parser of broker addresses: ``[mqtt] brokers`` and ``edgectl --broker`` use it.
    """
    host, port = value, str(default_port)
    if value.startswith("["):
        host, close, rest = value[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise ValueError("expected [IPv6]:PORT")
        port = rest.removeprefix(":") or port
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif ":" in value:
        raise ValueError("put an IPv6 address in brackets ([::1]:1883)")
    if not host or any(ch.isspace() or ch in "/[]" for ch in host):
        raise ValueError("expected HOST:PORT")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT with a port from 1 to 65535")
    return host, int(port)


def broker_list(value: Any) -> tuple[str, ...]:
    """Distinct ``"host:port"`` entries (``"[v6]:port"`` for IPv6), in the order given."""
    if not isinstance(value, list | tuple):
        raise Invalid('expected a list of "host:port" strings', value)
    items: list[str] = []
    seen: set[tuple[str, int]] = set()
    for index, item in enumerate(value):
        at = f"[{index}]"
        if not isinstance(item, str):
            raise Invalid('expected a "host:port" string', item, at)
        try:
            address = split_broker(item)
        except ValueError as exc:
            raise Invalid(str(exc), item, at) from None
        if address in seen:
            raise Invalid("duplicate entry", item, at)
        seen.add(address)
        items.append(item)
    return tuple(items)


def reply_prefixes(value: Any) -> tuple[str, ...]:
    """Distinct topic prefixes replies may go to: no wildcards, NUL or leading ``$``."""
    if not isinstance(value, list | tuple):
        raise Invalid("expected a list of topic prefixes", value)
    items: list[str] = []
    for index, item in enumerate(value):
        at = f"[{index}]"
        if not isinstance(item, str) or not item:
            raise Invalid("expected a non-empty topic prefix", item, at)
        if "+" in item or "#" in item or "\x00" in item:
            raise Invalid('must not contain "+", "#" or NUL', item, at)
        if item.startswith("$"):
            raise Invalid('must not start with "$" (reserved for the broker)', item, at)
        if item in items:
            raise Invalid("duplicate entry", item, at)
        items.append(item)
    return tuple(items)


def key_files(value: Any) -> tuple[str, ...]:
    """A list of distinct absolute paths (public key files); the files are read at start."""
    if not isinstance(value, list | tuple):
        raise Invalid("expected a list of absolute paths", value)
    items: list[str] = []
    for index, item in enumerate(value):
        try:
            text = path(required=True)(item)
        except Invalid as exc:
            raise Invalid(exc.problem, item, at=f"[{index}]") from None
        if not text.startswith("/"):
            raise Invalid("expected an absolute path", item, at=f"[{index}]")
        if text in items:
            raise Invalid("duplicate entry", item, at=f"[{index}]")
        items.append(text)
    return tuple(items)
