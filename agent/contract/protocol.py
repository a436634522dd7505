"""The wire contract in code: topic names and message encode / decode / validate.

Owns every topic string the agent (and the cloud-side controller) publishes or subscribes to, and
the JSON of every message. Decoders take raw payload bytes and raise the contract's errors, whose
message names the message, the field, what was wrong and the (truncated) value given::

    DeploymentRejected      a function spec (decode_spec, code_bytes)
    BadRequest              any other message (decode_status, decode_sync_desired, ...)
    └── InvokeDecodeError   an invocation; carries the request_id / function_id / reply_to
                            that could be salvaged so the error reply can still be sent

Encoders check their message with the same rules and raise ``ValueError`` (a value outside the
contract) or ``TypeError`` (a reply result that is not JSON): both are bugs in the caller, and
the agent never publishes a message that its own decoders would refuse.

Must never: do I/O (no sockets, no paho, no files, no logging), import anything beyond the
stdlib and the pure ``agent.errors`` / ``agent.contract.ids`` / ``agent.models``, or read any
clock but ``time.time()`` (and that only for ``ts``). The worker may import this module. The
rules for ids, versions, request ids and topic prefixes are ``contract.ids``'s (re-exported here).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from base64 import b64decode
from binascii import Error as BinasciiError
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, NoReturn

# The name rules live in agent.contract.ids; re-exported here, where the callers always found them.
from agent.contract.ids import HEX64_RE as _HEX64_RE
from agent.contract.ids import ID_RE as ID_RE
from agent.contract.ids import KEY_ID_RE as KEY_ID_RE
from agent.contract.ids import MAX_REQUEST_ID_CHARS as MAX_REQUEST_ID_CHARS
from agent.contract.ids import MAX_TOPIC_BYTES as MAX_TOPIC_BYTES
from agent.contract.ids import TOPIC_CHARSETS as TOPIC_CHARSETS
from agent.contract.ids import VERSION_RE as VERSION_RE
from agent.contract.ids import is_valid_id as is_valid_id
from agent.contract.ids import is_valid_prefix as is_valid_prefix
from agent.contract.ids import is_valid_publish_topic as is_valid_publish_topic
from agent.contract.ids import is_valid_request_id as is_valid_request_id
from agent.contract.ids import topic_charset_problem as topic_charset_problem
from agent.errors import ERROR_TYPES, BadRequest, DeploymentRejected
from agent.errors import InvokeDecodeError as InvokeDecodeError  # the tree is in agent.errors
from agent.models import EdgeNodeStatus, canonical_json, state_checksum

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TS_RE = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$"
)

NODE_STATUSES: Final = frozenset(s.value for s in EdgeNodeStatus)
FUNCTION_STATES: Final = frozenset({"active", "failed", "rejected", "removed"})
CODE_FORMATS: Final = ("source", "zip")

TopicKind = Literal[
    "fleet_spec",
    "node_spec",
    "fleet_index",
    "node_index",
    "rollcall",
    "invoke",
    "sync_desired",
    "sync_request",
    "unknown",
]
#: ``mqtt.retained_wildcards``: does the broker replay retained messages to wildcard
#: subscriptions? "yes" (MQTT says it must), "no" (RabbitMQ before 3.13: exact-topic
#: compatibility mode, see docs/protocol.md *Brokers without retained wildcards*), "auto".
RETAINED_WILDCARDS: Final = ("auto", "yes", "no")
#: The longest answer window a roll call may ask for (seconds); longer ones are clamped.
MAX_ROLLCALL_WINDOW_S: Final = 300.0
#: Most function ids one spec index may list, and most bytes of an index message: an agent
#: subscribes to one exact topic per id, so a hostile retained index must stay cheap to
#: follow (90,000 listed ids once blocked an agent's loop for a minute).
MAX_INDEX_FUNCTIONS: Final = 1000
MAX_INDEX_BYTES: Final = 128 * 1024
FleetTopicKind = Literal[
    "status", "heartbeat", "function_state", "sync_delta", "sync_snapshot", "replies", "unknown"
]
_Err = type[Exception]


# --------------------------------------------------------------------------- ids, topics, time


def now_ts(t: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds and ``Z`` from ``t`` or ``time.time()``."""
    when = datetime.fromtimestamp(time.time() if t is None else t, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_ts(s: str) -> datetime:
    """The aware datetime of an RFC 3339 ``ts``; ValueError when it is not one."""
    if not isinstance(s, str) or not _TS_RE.fullmatch(s):
        raise ValueError(f"not an RFC 3339 timestamp: {_show(s)}")
    return datetime.fromisoformat(s)  # also rejects month 13, hour 25, ...


def _check_prefix(prefix: str) -> None:
    if not is_valid_prefix(prefix):
        raise ValueError(
            f"topic prefix: expected non-empty levels without +, # or NUL, got {_show(prefix)}"
        )


def _check_id(kind: str, value: str) -> str:
    if not is_valid_id(value):
        raise ValueError(f"{kind}: expected an id matching {ID_RE.pattern}, got {_show(value)}")
    return value


@dataclass(frozen=True)
class Topics:
    """The topics of one node, as the agent on that node uses them."""

    prefix: str
    node_id: str

    def __post_init__(self) -> None:
        _check_prefix(self.prefix)
        _check_id("node id", self.node_id)

    @staticmethod
    def for_fleet(prefix: str) -> FleetTopics:
        """The cloud side's view: filters over every node under ``prefix``."""
        return FleetTopics(prefix)

    @property
    def _node(self) -> str:
        return f"{self.prefix}/nodes/{self.node_id}"

    @property
    def status(self) -> str:
        return f"{self._node}/status"

    @property
    def heartbeat(self) -> str:
        return f"{self._node}/heartbeat"

    @property
    def invoke(self) -> str:
        return f"{self._node}/invoke"

    @property
    def replies(self) -> str:
        """The default reply topic, used when a request names no other."""
        return f"{self._node}/replies"

    @property
    def sync_delta(self) -> str:
        return f"{self._node}/sync/delta"

    @property
    def sync_desired(self) -> str:
        return f"{self._node}/sync/desired"

    @property
    def sync_request(self) -> str:
        return f"{self._node}/sync/request"

    @property
    def sync_snapshot(self) -> str:
        return f"{self._node}/sync/snapshot"

    def node_function(self, fid: str) -> str:
        return f"{self._node}/functions/{_check_id('function id', fid)}"

    def fleet_function(self, fid: str) -> str:
        return f"{self.prefix}/fleet/functions/{_check_id('function id', fid)}"

    def function_state(self, fid: str) -> str:
        return f"{self.node_function(fid)}/state"

    @property
    def fleet_index(self) -> str:
        return f"{self.prefix}/fleet/index"

    @property
    def node_index(self) -> str:
        return f"{self._node}/index"

    @property
    def rollcall(self) -> str:
        return f"{self.prefix}/fleet/rollcall"

    def subscriptions(self, retained_wildcards: str = "yes") -> list[str]:
        """The topic filters the agent subscribes to (QoS 1; the roll call at QoS 0).

        Unless the broker is known to replay retained messages to wildcard filters
        (``retained_wildcards`` "yes"), the exact index and roll-call topics follow the
        wildcards: last, so that a broker that does replay has sent every retained spec
        before the indexes arrive (see :class:`agent.contract.specindex.IndexFollower`).
        """
        filters = [
            f"{self.prefix}/fleet/functions/+",
            f"{self._node}/functions/+",
            self.invoke,
            self.sync_desired,
            self.sync_request,
        ]
        if retained_wildcards != "yes":
            filters += [self.fleet_index, self.node_index, self.rollcall]
        return filters

    def classify(self, topic: str) -> tuple[TopicKind, str | None]:
        """What an incoming topic is; a function id only comes back when it is a valid id."""
        fleet = f"{self.prefix}/fleet/functions/"
        if topic.startswith(fleet):
            fid = topic[len(fleet) :]
            return ("fleet_spec", fid) if is_valid_id(fid) else ("unknown", None)
        if topic == self.fleet_index:
            return ("fleet_index", None)
        if topic == self.rollcall:
            return ("rollcall", None)
        node = f"{self._node}/"
        if not topic.startswith(node):
            return ("unknown", None)  # another node's topic, or not ours at all
        rest = topic[len(node) :]
        if rest == "invoke":
            return ("invoke", None)
        if rest == "index":
            return ("node_index", None)
        if rest == "sync/desired":
            return ("sync_desired", None)
        if rest == "sync/request":
            return ("sync_request", None)
        if rest.startswith("functions/"):
            fid = rest[len("functions/") :]
            if is_valid_id(fid):  # "f1/state" has a "/" and is no id: not a spec
                return ("node_spec", fid)
        return ("unknown", None)

    def reply_topic(
        self,
        response_topic: str | None = None,
        reply_to: str | None = None,
        allowed_prefixes: Iterable[str] = (),
    ) -> str:
        """Where the reply goes: :meth:`reply_address`'s topic (:attr:`replies` if refused)."""
        return self.reply_address(response_topic, reply_to, allowed_prefixes).topic

    def reply_address(
        self,
        response_topic: str | None = None,
        reply_to: str | None = None,
        allowed_prefixes: Iterable[str] = (),
        charset: str = "any",
    ) -> ReplyAddress:
        """The MQTT 5 Response Topic, else ``reply_to``, else :attr:`replies`, checked.

        Both addresses the request names are checked with :func:`reply_address_problem`
        (an empty Response Topic counts as none). If either is refused the whole request is:
        the topic is then :attr:`replies` and ``refused`` says why, so the caller answers
        ``bad_request`` there and does not run the handler.
        """
        allowed = tuple(allowed_prefixes)
        named = [
            (what, topic)
            for what, topic in (("Response Topic", response_topic), ("reply_to", reply_to))
            if topic is not None and (topic != "" or what == "reply_to")
        ]
        for what, topic in named:
            problem = reply_address_problem(
                topic,
                prefix=self.prefix,
                node_id=self.node_id,
                allowed_prefixes=allowed,
                charset=charset,
            )
            if problem is not None:
                return ReplyAddress(self.replies, f"{what} {_show(topic)}: {problem}")
        return ReplyAddress(named[0][1] if named else self.replies, None)


@dataclass(frozen=True)
class ReplyAddress:
    """Where a reply goes; ``refused`` is why the request's own address was not accepted."""

    topic: str
    refused: str | None = None


#: Levels under ``<prefix>/`` that belong to the contract: no reply may land in them, except
#: the reply topics the contract itself defines (see :func:`reply_address_problem`).
CONTRACT_NAMESPACES: Final = ("fleet", "nodes", "controllers")


def reply_address_problem(
    topic: object,
    *,
    prefix: str,
    node_id: str,
    allowed_prefixes: Iterable[str] = (),
    charset: str = "any",
) -> str | None:
    """Why ``topic`` may not receive a reply of node ``node_id``; None when it may.

    In order:

    1. Not a topic one may publish to (empty, ``+``, ``#``, NUL, leading ``$``, not UTF-8,
       over 65535 bytes), or outside ``charset`` (``mqtt.topic_charset``: "portable"
       refuses ``.`` and spaces, which would make NATS drop the connection): refused.
    2. The contract's reply topics are allowed: exactly ``<prefix>/nodes/<node_id>/replies``
       and exactly ``<prefix>/controllers/<id>/replies`` for any valid id (what
       ``agent.cloud.controller`` subscribes to; nothing below them).
    3. ``<prefix>/fleet``, ``<prefix>/nodes``, ``<prefix>/controllers`` and everything under
       them: refused. Those are specs, invocations, statuses, desired state, another node's
       or a controller's topics: a reply there would be read as one of them.
    4. ``allowed_prefixes`` (``mqtt.reply_prefixes``) non-empty: allowed only when the topic
       starts with one of them (plain string prefixes: end one with ``/`` for a subtree).
    5. Otherwise allowed (the rest of ``<prefix>/`` and anything outside it).
    """
    if not is_valid_publish_topic(topic):
        return "not a topic to publish to (empty, +, #, NUL, a leading $, or too long)"
    charset_problem = topic_charset_problem(topic, charset)
    if charset_problem is not None:
        return charset_problem
    if topic == f"{prefix}/nodes/{node_id}/replies":
        return None
    if topic.startswith(f"{prefix}/"):
        rest = topic[len(prefix) + 1 :].split("/")
        if len(rest) == 3 and rest[0] == "controllers" and rest[2] == "replies":
            return None if is_valid_id(rest[1]) else f"{_show(rest[1])} is no controller id"
        if rest[0] in CONTRACT_NAMESPACES:
            return (
                f"falls under {prefix}/{rest[0]}/, which belongs to the wire contract "
                f"(the only reply topics there are {prefix}/nodes/{node_id}/replies and "
                f"{prefix}/controllers/<id>/replies)"
            )
    allowed = tuple(allowed_prefixes)
    if allowed and not any(topic.startswith(start) for start in allowed):
        return f"outside mqtt.reply_prefixes ({', '.join(allowed)})"
    return None


def parse_node_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """``(node_id, rest)`` of ``<prefix>/nodes/<node_id>/<rest>``, or None."""
    head = f"{prefix}/nodes/"
    if not topic.startswith(head):
        return None
    node_id, sep, rest = topic[len(head) :].partition("/")
    if not sep or not rest or not is_valid_id(node_id):
        return None
    return node_id, rest


@dataclass(frozen=True)
class FleetTopics:
    """The cloud side's topics: filters over every node of a prefix."""

    prefix: str

    def __post_init__(self) -> None:
        _check_prefix(self.prefix)

    def node(self, node_id: str) -> Topics:
        return Topics(self.prefix, node_id)

    def fleet_function(self, fid: str) -> str:
        return f"{self.prefix}/fleet/functions/{_check_id('function id', fid)}"

    @property
    def fleet_index(self) -> str:
        return f"{self.prefix}/fleet/index"

    @property
    def node_catalog(self) -> str:
        """Which nodes have specs of their own (the controllers' copy of the node indexes)."""
        return f"{self.prefix}/fleet/node-index"

    @property
    def rollcall(self) -> str:
        return f"{self.prefix}/fleet/rollcall"

    @property
    def status(self) -> str:
        return f"{self.prefix}/nodes/+/status"

    @property
    def heartbeat(self) -> str:
        return f"{self.prefix}/nodes/+/heartbeat"

    @property
    def function_state(self) -> str:
        return f"{self.prefix}/nodes/+/functions/+/state"

    @property
    def sync_delta(self) -> str:
        return f"{self.prefix}/nodes/+/sync/delta"

    @property
    def sync_snapshot(self) -> str:
        return f"{self.prefix}/nodes/+/sync/snapshot"

    @property
    def replies(self) -> str:
        return f"{self.prefix}/nodes/+/replies"

    def subscriptions(self) -> list[str]:
        """The filters a controller subscribes to for everything the fleet publishes."""
        return [
            self.status,
            self.heartbeat,
            self.function_state,
            self.sync_delta,
            self.sync_snapshot,
            self.replies,
        ]

    def classify(self, topic: str) -> tuple[FleetTopicKind, str | None, str | None]:
        """``(kind, node_id, function_id)`` of a topic a node published."""
        parsed = parse_node_topic(self.prefix, topic)
        if parsed is None:
            return ("unknown", None, None)
        node_id, rest = parsed
        simple: dict[str, FleetTopicKind] = {
            "status": "status",
            "heartbeat": "heartbeat",
            "sync/delta": "sync_delta",
            "sync/snapshot": "sync_snapshot",
            "replies": "replies",
        }
        if rest in simple:
            return (simple[rest], node_id, None)
        parts = rest.split("/")
        is_state = len(parts) == 3 and parts[0] == "functions" and parts[2] == "state"
        if is_state and is_valid_id(parts[1]):
            return ("function_state", node_id, parts[1])
        return ("unknown", None, None)


# --------------------------------------------------------------------------- JSON plumbing


def _show(value: Any, limit: int = 60) -> str:
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


def _load_object(payload: bytes, what: str, err: _Err) -> dict[str, Any]:
    """Decode UTF-8 JSON that must be an object; everything else is ``err`` naming ``what``."""
    if not payload:
        raise err(f"{what}: payload is empty")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = bytes(payload[exc.start : exc.start + 4])
        raise err(f"{what}: payload is not UTF-8 (byte {exc.start}: {bad!r})") from exc
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise err(
            f"{what}: payload is not JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
        ) from exc
    except (ValueError, RecursionError) as exc:  # NaN, 5000-digit ints, [[[[...]]]]
        raise err(f"{what}: payload is not usable JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise err(f"{what}: expected a JSON object, got {_show(obj)}")
    return obj


def _dumps(msg: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; strings holding lone surrogates fall back to ``\\u`` escapes."""
    try:
        return json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except UnicodeEncodeError:
        return json.dumps(msg, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _copy(value: Any) -> Any:
    """A shallow copy of a mapping; anything else unchanged, for the checker to name."""
    return dict(value) if isinstance(value, Mapping) else value


def _merge_extra(msg: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or key in msg:
            raise ValueError(f"extra field {key!r} is not a string or would overwrite a field")
        msg[key] = value
    return msg


class _Fields:
    """Typed reads from one JSON object; every error names the message, the field and the value."""

    __slots__ = ("_err", "_obj", "_path", "_what")

    def __init__(self, obj: Mapping[str, Any], what: str, err: _Err, path: str = "") -> None:
        self._obj, self._what, self._err, self._path = obj, what, err, path

    def fail(self, key: str, problem: str) -> NoReturn:
        raise self._err(f"{self._what}: {self._path}{key}: {problem}")

    def bad(self, key: str, expected: str, value: Any) -> NoReturn:
        self.fail(key, f"expected {expected}, got {_show(value)}")

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
        return self.text(key, "64 hex characters (a SHA-256)", _HEX64_RE).lower()

    def ts(self, key: str = "ts") -> str:
        value = self.text(key, "an RFC 3339 timestamp", _TS_RE)
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

    def child(self, key: str, obj: Mapping[str, Any]) -> _Fields:
        return _Fields(obj, self._what, self._err, f"{self._path}{key}.")

    def error(self, key: str = "error") -> dict[str, Any]:
        err = self.obj(key)
        sub = self.child(key, err)
        sub.choice("type", ERROR_TYPES)
        sub.text("message")
        return err


def _request_id(f: _Fields, key: str = "request_id") -> str:
    value = f.raw(key)
    if not is_valid_request_id(value):
        f.bad(key, f"1 to {MAX_REQUEST_ID_CHARS} printable characters", value)
    return value


def _strings(f: _Fields, key: str, values: list[Any]) -> list[str]:
    for i, item in enumerate(values):
        if not isinstance(item, str) or not item:
            f.bad(f"{key}[{i}]", "a non-empty string", item)
    return values


# --------------------------------------------------------------------------- function specs


@dataclass(frozen=True)
class CodeSpec:
    """A function's code: source text or base64 of a zip, with the SHA-256 of the raw bytes.

    Or code by reference (``url`` set, ``data`` empty): ``size`` bytes at ``url`` (https),
    fetched to disk and checked by :mod:`agent.edge.fetch`, for code too big for a spec.
    """

    format: Literal["source", "zip"]
    data: str = field(repr=False)  # may be megabytes: keep it out of logs
    sha256: str
    url: str = ""
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        if self.url:
            return {
                "format": self.format,
                "url": self.url,
                "sha256": self.sha256,
                "size": self.size,
            }
        return {"format": self.format, "data": self.data, "sha256": self.sha256}


@dataclass(frozen=True)
class SpecSignature:
    """An ed25519 signature over :func:`signing_bytes` of the spec that carries it."""

    key_id: str
    sig: str  # base64 of the 64-byte signature

    def to_dict(self) -> dict[str, str]:
        return {"key_id": self.key_id, "sig": self.sig}


@dataclass(frozen=True)
class FunctionSpec:
    """A function spec as the cloud publishes it; ``extra`` keeps fields this version ignores."""

    id: str
    name: str
    version: str
    entrypoint: str
    code: CodeSpec
    memory_mb: int
    timeout_seconds: float
    environment: dict[str, str] = field(default_factory=dict, hash=False)
    requires: list[str] = field(default_factory=list, hash=False)
    concurrency: int = 1
    #: ``SpecSignature`` on a signed spec; a string is carried for old senders, never trusted.
    signature: SpecSignature | str | None = None
    #: Signed deployments: only goes up per function and scope (replay and downgrade guard).
    sequence: int | None = None
    #: Signed deployments: ``"fleet"`` or the node id the spec was signed for.
    target: str | None = None
    #: Most processes and threads of the function at once (its uid's RLIMIT_NPROC);
    #: None: the node's ``runtime.max_processes``.
    max_processes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


_SPEC_FIELDS: Final = frozenset(FunctionSpec.__dataclass_fields__) - {"extra"}
#: Written only when set, so an older spec's JSON (and fingerprint) is what it always was.
_OPTIONAL_SIGNING_FIELDS: Final = ("sequence", "target", "max_processes")
FLEET_TARGET: Final = "fleet"
_B64_RE = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
#: ``code.url``: https (``file`` too, for tests and local mirrors: agent.edge.fetch decides).
_URL_RE = re.compile(r"^(https|file)://[^\s]{1,2048}$")


def _spec_from_obj(obj: Mapping[str, Any], err: _Err) -> FunctionSpec:
    """Validate in field order, so the first error reported is the first bad field."""
    fid = _Fields(obj, "function spec", err).id("id")
    f = _Fields(obj, f'function spec "{fid}"', err)
    concurrency = obj.get("concurrency")
    return FunctionSpec(
        id=fid,
        name=f.text("name"),
        version=f.text("version", f"a version matching {VERSION_RE.pattern}", VERSION_RE),
        entrypoint=_entrypoint(f),
        code=_code(f),
        memory_mb=f.integer("memory_mb", minimum=1),
        timeout_seconds=f.number("timeout_seconds", positive=True),
        environment=_environment(f),
        requires=list(_strings(f, "requires", f.array("requires", optional=True))),
        concurrency=1 if concurrency is None else f.integer("concurrency", minimum=1),
        signature=_signature(f, obj.get("signature")),
        sequence=None if obj.get("sequence") is None else f.integer("sequence", minimum=0),
        target=_target(f, obj.get("target")),
        max_processes=(
            None if obj.get("max_processes") is None else f.integer("max_processes", minimum=1)
        ),
        extra={k: v for k, v in obj.items() if k not in _SPEC_FIELDS},
    )


def _signature(f: _Fields, value: Any) -> SpecSignature | str | None:
    """An object ``{key_id, sig}``; a string or null is tolerated here (the trust policy
    refuses it when signatures are required)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, dict):
        f.bad("signature", "a string or null", value)  # the old message, kept for old tests
    s = f.child("signature", value)
    for key in value:
        if key not in ("key_id", "sig"):
            s.fail(key, "unknown field (a signature is {key_id, sig})")
    return SpecSignature(
        key_id=s.text("key_id", "16 lowercase hex digits", KEY_ID_RE),
        sig=s.text("sig", "base64 of an ed25519 signature", _B64_RE),
    )


def _target(f: _Fields, value: Any) -> str | None:
    if value is None:
        return None
    if value != FLEET_TARGET and not is_valid_id(value):
        f.bad("target", f'"{FLEET_TARGET}" or a node id', value)
    return str(value)


def _entrypoint(f: _Fields) -> str:
    value = f.text("entrypoint", '"module:attr"')
    module, sep, attr = value.partition(":")
    if not (sep and attr.isidentifier() and all(p.isidentifier() for p in module.split("."))):
        f.bad("entrypoint", '"module:attr" (dotted module of identifiers, an identifier)', value)
    return value


def _code(f: _Fields) -> CodeSpec:
    code = f.obj("code")
    c = f.child("code", code)
    fmt = c.choice("format", CODE_FORMATS)
    if "url" in code:  # code by reference: {format, url, sha256, size}, no data
        if "data" in code:
            c.fail("data", "not allowed next to url (code is either inline or by reference)")
        url = c.text("url", "an https URL", _URL_RE)
        return CodeSpec(
            format="zip" if fmt == "zip" else "source",
            data="",
            sha256=c.hex64("sha256"),
            url=url,
            size=c.integer("size", minimum=1),
        )
    data = c.text("data")
    return CodeSpec(format="zip" if fmt == "zip" else "source", data=data, sha256=c.hex64("sha256"))


def _environment(f: _Fields) -> dict[str, str]:
    environment = f.obj("environment", optional=True)
    e = f.child("environment", environment)
    for key, value in environment.items():
        if not ENV_NAME_RE.fullmatch(key):
            e.fail(key, f"not an environment variable name (expected {ENV_NAME_RE.pattern})")
        if not isinstance(value, str) or "\0" in value or not _is_utf8(value):
            e.bad(key, "a UTF-8 string without NUL", value)
    return dict(environment)


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_spec(payload: bytes, *, expected_id: str | None = None) -> FunctionSpec:
    """Parse and validate a spec; ``expected_id`` is the id in its topic, which must match."""
    spec = _spec_from_obj(
        _load_object(payload, "function spec", DeploymentRejected), DeploymentRejected
    )
    if expected_id is not None and spec.id != expected_id:
        raise DeploymentRejected(
            f'function spec "{spec.id}": id: does not match the topic\'s id "{expected_id}"'
        )
    return spec


def spec_to_dict(spec: FunctionSpec) -> dict[str, Any]:
    """The wire form of a spec: every contract field (defaults included), then ``extra``."""
    data: dict[str, Any] = {
        "id": spec.id,
        "name": spec.name,
        "version": spec.version,
        "entrypoint": spec.entrypoint,
        "code": spec.code.to_dict(),
        "memory_mb": spec.memory_mb,
        "timeout_seconds": float(spec.timeout_seconds),  # 5 and 5.0: one fingerprint
        "environment": dict(spec.environment),
        "requires": list(spec.requires),
        "concurrency": spec.concurrency,
        "signature": (
            spec.signature.to_dict()
            if isinstance(spec.signature, SpecSignature)
            else spec.signature
        ),
    }
    for key in _OPTIONAL_SIGNING_FIELDS:
        if getattr(spec, key) is not None:
            data[key] = getattr(spec, key)
    return _merge_extra(data, spec.extra)


def signing_bytes(spec: FunctionSpec) -> bytes:
    """What a spec's signature covers: the canonical JSON (``agent.models.canonical_json``:
    sorted keys, compact, UTF-8) of its wire form without ``signature``, extra fields
    included. Computed from the decoded spec, so ``5`` and ``5.0`` sign alike."""
    data = spec_to_dict(spec)
    del data["signature"]
    try:
        return canonical_json(data)
    except UnicodeEncodeError:  # a lone surrogate: sign the escaped form
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def encode_spec(spec: FunctionSpec) -> bytes:
    """The JSON of a spec; ValueError when a field breaks the rules decode_spec enforces."""
    data = spec_to_dict(spec)
    _spec_from_obj(data, ValueError)
    return _dumps(data)


def spec_fingerprint(spec: FunctionSpec) -> str:
    """Hex SHA-256 of the canonical spec without ``extra``: equal means a no-op re-delivery."""
    data = {k: v for k, v in spec_to_dict(spec).items() if k in _SPEC_FIELDS}
    try:
        canonical = canonical_json(data)
    except UnicodeEncodeError:  # a lone surrogate (valid JSON, no UTF-8): hash the escapes
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def code_bytes(code: CodeSpec) -> bytes:
    """The raw bytes the ``sha256`` covers: UTF-8 of the source, or the base64-decoded zip."""
    if code.url:
        raise DeploymentRejected(
            "function spec: code.url: code by reference must be fetched (agent.edge.fetch), "
            "not decoded"
        )
    if code.format == "source":
        try:
            return code.data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DeploymentRejected(
                f"function spec: code.data: source is not UTF-8 ({exc})"
            ) from exc
    try:
        return b64decode(code.data, validate=True)
    except (BinasciiError, ValueError) as exc:
        raise DeploymentRejected(
            f"function spec: code.data: expected base64 of a zip, got {_show(code.data)} ({exc})"
        ) from exc


def is_removal(payload: bytes) -> bool:
    """An empty retained payload on a spec topic removes the function."""
    return len(payload) == 0


def requires_met(spec: FunctionSpec, capabilities: Iterable[str]) -> bool:
    """True when the node's capabilities cover ``spec.requires`` (else the node skips the spec)."""
    return set(spec.requires) <= set(capabilities)


# --------------------------------------------------------------------------- invocations


@dataclass(frozen=True)
class InvokeRequest:
    """One invocation request: ``payload`` is any JSON value, passed to the handler."""

    request_id: str
    function_id: str
    payload: Any
    reply_to: str | None = None


def decode_invoke(payload: bytes, max_bytes: int) -> InvokeRequest:
    """Parse an invocation; InvokeDecodeError carries the valid fields of a half-valid one."""
    if len(payload) > max_bytes:
        raise InvokeDecodeError(
            f"invoke: payload is {len(payload)} bytes, over the {max_bytes} limit"
        )
    obj = _load_object(payload, "invoke", InvokeDecodeError)
    raw_rid, raw_fid, raw_reply_to = (obj.get(k) for k in ("request_id", "function_id", "reply_to"))
    # Salvage every valid field first: the error reply needs whichever of them exist.
    request_id = raw_rid if is_valid_request_id(raw_rid) else None
    function_id = raw_fid if is_valid_id(raw_fid) else None
    reply_to = raw_reply_to if is_valid_publish_topic(raw_reply_to) else None

    def fail(key: str, problem: str) -> NoReturn:
        raise InvokeDecodeError(
            f"invoke: {key}: {problem}",
            request_id=request_id,
            function_id=function_id,
            reply_to=reply_to,
        )

    if request_id is None:
        fail(
            "request_id",
            f"expected 1 to {MAX_REQUEST_ID_CHARS} printable characters, "
            f"got {_show(raw_rid) if 'request_id' in obj else 'nothing'}",
        )
    if function_id is None:
        fail(
            "function_id",
            f"expected an id matching {ID_RE.pattern}, "
            f"got {_show(raw_fid) if 'function_id' in obj else 'nothing'}",
        )
    if "payload" not in obj:
        fail("payload", "required field missing (null is a valid payload)")
    if raw_reply_to is not None and reply_to is None:
        fail(
            "reply_to",
            f"expected a topic to publish to (no +, #, NUL or leading $), "
            f"got {_show(raw_reply_to)}",
        )
    return InvokeRequest(request_id, function_id, obj["payload"], reply_to)


def encode_invoke(
    request_id: str, function_id: str, payload: Any, reply_to: str | None = None
) -> bytes:
    """The cloud side's invocation message."""
    msg: dict[str, Any] = {"request_id": request_id, "function_id": function_id, "payload": payload}
    if reply_to is not None:
        msg["reply_to"] = reply_to
    encoded = _dumps(msg)
    try:
        decode_invoke(encoded, len(encoded))
    except InvokeDecodeError as exc:
        raise ValueError(str(exc)) from exc
    return encoded


def _check_reply(msg: Mapping[str, Any], err: _Err) -> None:
    f = _Fields(msg, "reply", err)
    ok = f.boolean("ok")
    if ok:
        _request_id(f)
        f.id("function_id")
        f.raw("result")
    else:
        kind = f.error()["type"]
        if f.raw("request_id") is not None:
            _request_id(f)
        elif kind != BadRequest.type:
            f.fail("request_id", "null is only allowed in bad_request replies")
        if f.raw("function_id") is not None:
            f.id("function_id")
    f.number("duration_ms")
    f.boolean("cold_start")
    f.ts()


def encode_reply(
    request_id: str | None,
    function_id: str | None,
    *,
    ok: bool,
    result: Any = None,
    error: Mapping[str, Any] | None = None,
    duration_ms: float,
    cold_start: bool,
    node_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """A reply; TypeError when ``result`` is not JSON (the daemon answers handler_error then).

    ``request_id``/``function_id`` may be None only in a ``bad_request`` reply to a request
    whose fields could not be salvaged.
    """
    if ok == (error is not None):
        raise ValueError("encode_reply: pass error exactly when ok is False")
    msg: dict[str, Any] = {"request_id": request_id, "function_id": function_id, "ok": ok}
    if ok:
        msg["result"] = result
    else:
        msg["error"] = _copy(error)
    msg.update(duration_ms=duration_ms, cold_start=cold_start, ts=now_ts())
    if node_id is not None:
        msg["node_id"] = _check_id("reply node_id", node_id)
    _check_reply(_merge_extra(msg, extra), ValueError)
    try:
        return _dumps(msg)
    except (TypeError, ValueError, RecursionError) as exc:
        try:
            _dumps({"result": result})
        except (TypeError, ValueError, RecursionError):
            raise TypeError(
                f"reply to {request_id!r}: the result of {function_id!r} "
                f"is not JSON-serialisable: {exc}"
            ) from exc
        raise TypeError(
            f"reply to {request_id!r}: extra or error is not JSON-serialisable: {exc}"
        ) from exc


def decode_reply(payload: bytes) -> dict[str, Any]:
    """A validated reply (cloud side)."""
    msg = _load_object(payload, "reply", BadRequest)
    _check_reply(msg, BadRequest)
    return msg


# ------------------------------------------------------------------ status, heartbeat, state


def _check_status(msg: Mapping[str, Any], err: _Err) -> None:
    f = _Fields(msg, "status", err)
    f.id("node_id")
    f.choice("status", NODE_STATUSES)
    f.ts()
    f.text("agent_version")
    f.text("name")
    f.text("location")
    _strings(f, "capabilities", f.array("capabilities"))


_SYSTEM_FIELDS: Final = (
    "cpu_percent",
    "memory_used_mb",
    "memory_total_mb",
    "disk_free_mb",
    "load_1m",
)
_FUNCTION_COUNTERS: Final = ("invocations", "errors", "timeouts")


def _check_heartbeat(msg: Mapping[str, Any], err: _Err) -> None:
    f = _Fields(msg, "heartbeat", err)
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


def _check_function_state(msg: Mapping[str, Any], err: _Err) -> None:
    f = _Fields(msg, "function state", err)
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
    return _encode(msg, extra, _check_status)


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
        "system": _copy(system),
        "functions": [_copy(entry) for entry in functions],
    }
    return _encode(msg, extra, _check_heartbeat)


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
        "error": _copy(error),
        "ts": now_ts(),
    }
    return _encode(msg, extra, _check_function_state)


def _encode(
    msg: dict[str, Any],
    extra: Mapping[str, Any] | None,
    check: Callable[[Mapping[str, Any], _Err], None],
) -> bytes:
    check(_merge_extra(msg, extra), ValueError)
    try:
        return _dumps(msg)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"message is not JSON-serialisable: {exc}") from exc


def _decode(
    payload: bytes, what: str, check: Callable[[Mapping[str, Any], _Err], None]
) -> dict[str, Any]:
    msg = _load_object(payload, what, BadRequest)
    check(msg, BadRequest)
    return msg


def decode_status(payload: bytes) -> dict[str, Any]:
    """A validated status message (cloud side)."""
    return _decode(payload, "status", _check_status)


def decode_heartbeat(payload: bytes) -> dict[str, Any]:
    """A validated heartbeat (cloud side)."""
    return _decode(payload, "heartbeat", _check_heartbeat)


def decode_function_state(payload: bytes) -> dict[str, Any]:
    """A validated function state message (cloud side)."""
    return _decode(payload, "function state", _check_function_state)


# --------------------------------------------------------------------------- sync


def _checksum(f: _Fields, data: Mapping[str, Any]) -> str:
    try:
        return state_checksum(data)
    except UnicodeEncodeError as exc:  # "\ud800" is valid JSON but has no UTF-8 to hash
        f.fail("data", f"holds a string that is not valid UTF-8 ({exc.reason})")


def _check_checksum(f: _Fields, msg: Mapping[str, Any]) -> None:
    if f.hex64("checksum") != _checksum(f, msg["data"]):
        f.bad("checksum", "the SHA-256 of the canonical JSON of data", msg["checksum"])


def _check_sync_delta(msg: Mapping[str, Any], err: _Err) -> None:
    f = _Fields(msg, "sync delta", err)
    start = f.integer("from_version")
    if f.integer("to_version") <= start:
        f.bad("to_version", f"an integer > from_version ({start})", msg["to_version"])
    f.obj("changes")
    f.hex64("checksum")


def _check_sync_snapshot(msg: Mapping[str, Any], err: _Err) -> None:
    f = _Fields(msg, "sync snapshot", err)
    _request_id(f)
    f.integer("version")
    f.obj("data")
    _check_checksum(f, msg)


def _check_sync_desired(msg: Mapping[str, Any], err: _Err) -> None:
    f = _Fields(msg, "sync desired", err)
    f.integer("version")
    f.obj("data")
    if msg.get("checksum") is not None:  # optional; verified when the cloud sends it
        _check_checksum(f, msg)


def _check_sync_request(msg: Mapping[str, Any], err: _Err) -> None:
    f = _Fields(msg, "sync request", err)
    _request_id(f)


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
        "changes": _copy(changes),
        "checksum": checksum,
        "ts": now_ts(),
    }
    return _encode(msg, extra, _check_sync_delta)


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
        "data": _copy(data),
        "checksum": checksum,
        "ts": now_ts(),
    }
    return _encode(msg, extra, _check_sync_snapshot)


def encode_sync_desired(version: int, data: Mapping[str, Any]) -> bytes:
    """The cloud side's desired state (retained), with its checksum."""
    msg: dict[str, Any] = {"version": version, "data": _copy(data), "checksum": None}
    if isinstance(data, Mapping):
        msg["checksum"] = _checksum(_Fields(msg, "sync desired", ValueError), data)
    return _encode(msg, None, _check_sync_desired)


def encode_sync_request(request_id: str) -> bytes:
    """The cloud side's request for a snapshot."""
    return _encode({"request_id": request_id}, None, _check_sync_request)


def decode_sync_desired(payload: bytes) -> tuple[int, dict[str, Any]]:
    """``(version, data)`` of a desired-state message."""
    msg = _decode(payload, "sync desired", _check_sync_desired)
    return msg["version"], msg["data"]


def decode_sync_request(payload: bytes) -> str:
    """The ``request_id`` of a snapshot request."""
    request_id: str = _decode(payload, "sync request", _check_sync_request)["request_id"]
    return request_id


def decode_sync_delta(payload: bytes) -> dict[str, Any]:
    """A validated delta (cloud side)."""
    return _decode(payload, "sync delta", _check_sync_delta)


def decode_sync_snapshot(payload: bytes) -> dict[str, Any]:
    """A validated snapshot whose checksum matches its data (cloud side)."""
    return _decode(payload, "sync snapshot", _check_sync_snapshot)


# --------------------------------------------------------------------------- spec indexes


def encode_spec_index(functions: Mapping[str, str]) -> bytes:
    """A retained spec index: ``{"functions": {fid: version}, "ts"}`` (sorted by id)."""
    msg: dict[str, Any] = {"functions": dict(sorted(functions.items())), "ts": now_ts()}
    _check_spec_index(msg, ValueError)
    return _dumps(msg)


def decode_spec_index(payload: bytes) -> dict[str, str]:
    """The ``functions`` of a spec index (fid -> version); empty for a cleared topic."""
    if not payload:
        return {}
    if len(payload) > MAX_INDEX_BYTES:
        raise BadRequest(
            f"spec index: {len(payload)} bytes, over the {MAX_INDEX_BYTES} an index may have"
        )
    msg = _load_object(payload, "spec index", BadRequest)
    _check_spec_index(msg, BadRequest)
    return dict(msg["functions"])


def _check_spec_index(msg: Mapping[str, Any], err: _Err) -> None:
    f = _Fields(msg, "spec index", err)
    functions = f.obj("functions")
    if len(functions) > MAX_INDEX_FUNCTIONS:
        raise err(
            f"spec index: {len(functions)} functions, over the {MAX_INDEX_FUNCTIONS} an index "
            "may list"
        )
    _check_functions(f, "functions", functions)
    f.ts()


def _check_functions(f: _Fields, key: str, functions: Mapping[str, Any]) -> None:
    """``{fid: version}``: valid function ids and versions."""
    g = f.child(key, functions)
    for fid in functions:
        if not is_valid_id(fid):
            g.bad(fid, f"a function id matching {ID_RE.pattern}", fid)
        g.text(fid, f"a version matching {VERSION_RE.pattern}", VERSION_RE)


def encode_node_catalog(nodes: Mapping[str, Mapping[str, str]]) -> bytes:
    """The controllers' catalog of per-node specs: ``{"nodes": {node: {fid: version}}, "ts"}``."""
    msg: dict[str, Any] = {
        "nodes": {n: dict(sorted(fns.items())) for n, fns in sorted(nodes.items()) if fns},
        "ts": now_ts(),
    }
    _check_node_catalog(msg, ValueError)
    return _dumps(msg)


def decode_node_catalog(payload: bytes) -> dict[str, dict[str, str]]:
    """node id -> (fid -> version) of a node catalog; empty for a cleared topic."""
    if not payload:
        return {}
    msg = _load_object(payload, "node index", BadRequest)
    _check_node_catalog(msg, BadRequest)
    return {n: dict(fns) for n, fns in msg["nodes"].items()}


def _check_node_catalog(msg: Mapping[str, Any], err: _Err) -> None:
    f = _Fields(msg, "node index", err)
    nodes = f.obj("nodes")
    g = f.child("nodes", nodes)
    for node_id in nodes:
        if not is_valid_id(node_id):
            g.bad(node_id, f"a node id matching {ID_RE.pattern}", node_id)
        _check_functions(g, node_id, g.obj(node_id))
    f.ts()


def encode_rollcall(request_id: str, window_s: float) -> bytes:
    """A roll call: every agent answers within ``window_s`` (at a random moment in it)."""
    msg = {"request_id": request_id, "window_s": window_s}
    _check_rollcall(msg, ValueError)
    return _dumps(msg)


def decode_rollcall(payload: bytes) -> tuple[str, float]:
    """``(request_id, window_s)`` of a roll call, the window clamped to
    ``MAX_ROLLCALL_WINDOW_S``."""
    msg = _load_object(payload, "roll call", BadRequest)
    _check_rollcall(msg, BadRequest)
    return msg["request_id"], min(float(msg["window_s"]), MAX_ROLLCALL_WINDOW_S)


def _check_rollcall(msg: Mapping[str, Any], err: _Err) -> None:
    f = _Fields(msg, "roll call", err)
    _request_id(f)
    f.number("window_s")
