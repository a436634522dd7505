"""The agent's TOML configuration: schema, validation and the annotated default file.

Owns the frozen :class:`Config` tree and the one table that knows every key: each dataclass
field carries its default, its converter (one small validator per field type, as supervisor's
``datatypes.py`` has) and the comment written above it in the default file. The reference
``config/agent.toml`` is :func:`render_default_config` output, so code and file cannot drift.

A loaded ``Config`` holds *effective* values: ``node.name`` is filled from ``node.id`` and
``mqtt.client_id`` from :func:`effective_client_id` when left empty.

Every problem raises :class:`~agent.errors.ConfigError`, one line per problem, each naming
the source, the dotted key and the bad value (``agent.toml: mqtt.keepalive: expected an
integer from 5 to 3600, got "ten"``). This module must never touch anything but the one file
it is given: it does not read the password file, create directories, log, or hand back a
partly validated config.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import textwrap
import tomllib
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

from agent.contract import ids

# The id rule is agent.contract.ids's (one table for every name rule); re-exported where it
# always was.
from agent.contract.ids import ID_PATTERN as ID_PATTERN
from agent.contract.ids import ID_RE as ID_RE
from agent.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/edge-agent/agent.toml"

#: The node id written into a freshly rendered default file.
EXAMPLE_NODE_ID = "gw-01"

_MAX_MQTT_PAYLOAD = 268_435_455  # the largest remaining length an MQTT packet can declare


def is_valid_id(value: object) -> bool:
    """True when ``value`` is a string that is a valid node or function id (``contract.ids``)."""
    return ids.is_valid_id(value)


def effective_client_id(node_id: str, client_id: str = "") -> str:
    """The MQTT client id to connect with: ``client_id``, or ``edge-agent-<node_id>``."""
    return client_id or f"edge-agent-{node_id}"


# --- converters: each takes the raw TOML value and returns the typed one or raises _Invalid


Convert = Callable[[Any], Any]


class _Invalid(Exception):
    """A value broke its key's rule; ``at`` locates it inside the value (``[2]``)."""

    def __init__(self, problem: str, value: Any, at: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.value = value
        self.at = at


def _show(value: Any) -> str:
    """A value as the operator wrote it in TOML, cut short when long."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, Mapping):
        text = "a table"
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(_show(item) for item in value) + "]"
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
            raise _Invalid(want, value)
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
            raise _Invalid(want, value)
        if value < minimum or (exclusive and value == minimum):
            raise _Invalid(want, value)
        return float(value)

    return convert


def flag(value: Any) -> bool:
    """A TOML boolean; "yes", "true" and 1 are refused so typos cannot flip a switch."""
    if not isinstance(value, bool):
        raise _Invalid("expected true or false", value)
    return value


def string(*, empty: bool = True, blanks: bool = True, noun: str = "string") -> Convert:
    """A string without control characters; optionally non-empty and without whitespace."""
    noun = noun if empty else f"non-empty {noun}"
    want = f"expected a {noun}" + ("" if blanks else " without whitespace")

    def convert(value: Any) -> str:
        if not isinstance(value, str) or (not empty and not value):
            raise _Invalid(want, value)
        if not blanks and any(ch.isspace() for ch in value):
            raise _Invalid(want, value)
        if any(unicodedata.category(ch) == "Cc" for ch in value):
            raise _Invalid(f"expected a {noun} without control characters", value)
        return value

    return convert


def path(*, required: bool = False) -> Convert:
    """A file system path, kept as a string; empty means "not set" unless required."""
    return string(empty=not required, noun="path")


def identifier(value: Any) -> str:
    """A node or function id (:data:`ID_PATTERN`)."""
    if not is_valid_id(value):
        raise _Invalid(f"expected an id of {ids.ID_RULE} ({ID_PATTERN})", value)
    return str(value)


_word = string(empty=False, blanks=False)


def string_list(value: Any) -> tuple[str, ...]:
    """A list of distinct non-empty strings without whitespace, kept as a tuple."""
    if not isinstance(value, list | tuple):
        raise _Invalid("expected a list of strings", value)
    items: list[str] = []
    for index, item in enumerate(value):
        try:
            word = _word(item)
        except _Invalid as exc:
            raise _Invalid(exc.problem, item, at=f"[{index}]") from None
        if word in items:
            raise _Invalid("duplicate entry", item, at=f"[{index}]")
        items.append(word)
    return tuple(items)


def uid_range(value: Any) -> str:
    """``"FIRST-LAST"`` (uids, 1000 <= FIRST <= LAST < 2**31-1, at least 1), or ``""`` for none."""
    if value == "":
        return ""
    want = 'expected "FIRST-LAST" with 1000 <= FIRST <= LAST <= 2147483646, or ""'
    if not isinstance(value, str):
        raise _Invalid(want, value)
    first, sep, last = value.partition("-")
    if not sep or not first.isdigit() or not last.isdigit():
        raise _Invalid(want, value)
    low, high = int(first), int(last)
    if not 1000 <= low <= high <= 2147483646:
        raise _Invalid(want, value)
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
            raise _Invalid(want, value)
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
        raise _Invalid(problem, value)
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
        raise _Invalid('expected a list of "host:port" strings', value)
    items: list[str] = []
    seen: set[tuple[str, int]] = set()
    for index, item in enumerate(value):
        at = f"[{index}]"
        if not isinstance(item, str):
            raise _Invalid('expected a "host:port" string', item, at)
        try:
            address = split_broker(item)
        except ValueError as exc:
            raise _Invalid(str(exc), item, at) from None
        if address in seen:
            raise _Invalid("duplicate entry", item, at)
        seen.add(address)
        items.append(item)
    return tuple(items)


def reply_prefixes(value: Any) -> tuple[str, ...]:
    """Distinct topic prefixes replies may go to: no wildcards, NUL or leading ``$``."""
    if not isinstance(value, list | tuple):
        raise _Invalid("expected a list of topic prefixes", value)
    items: list[str] = []
    for index, item in enumerate(value):
        at = f"[{index}]"
        if not isinstance(item, str) or not item:
            raise _Invalid("expected a non-empty topic prefix", item, at)
        if "+" in item or "#" in item or "\x00" in item:
            raise _Invalid('must not contain "+", "#" or NUL', item, at)
        if item.startswith("$"):
            raise _Invalid('must not start with "$" (reserved for the broker)', item, at)
        if item in items:
            raise _Invalid("duplicate entry", item, at)
        items.append(item)
    return tuple(items)


# --- the schema: every key's default, converter and documentation live on its field


def _meta(convert: Convert, doc: str) -> dict[str, Any]:
    return {"convert": convert, "doc": doc}


def _key(default: Any, convert: Convert, doc: str) -> Any:
    """A config key: a dataclass field whose metadata holds its converter and its comment."""
    return field(default=default, metadata=_meta(convert, doc))


@dataclass(frozen=True)
class NodeConfig:
    """``[node]``: this gateway's identity."""

    id: str = field(
        metadata=_meta(
            identifier,
            "This node's id (required): 1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit; no dots, spaces, '+', '#' or '/'. It names this node's MQTT "
            "topics and must be unique in the fleet: two agents with one id take over each "
            "other's connection.",
        )
    )
    name: str = _key("", string(), "Display name for the status message; empty means the id.")
    location: str = _key("", string(), 'Free-form location for the status message ("line 4").')
    capabilities: tuple[str, ...] = _key(
        (),
        string_list,
        'What this node offers, e.g. ["gpio", "camera"]: a function whose spec requires a '
        "capability not listed here is skipped. Entries are non-empty, without spaces.",
    )

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.id)


@dataclass(frozen=True)
class MqttConfig:
    """``[mqtt]``: the cloud broker and how to reach it."""

    host: str = _key("127.0.0.1", _word, "Broker host name or IP address.")
    port: int = _key(1883, integer(1, 65535), "Broker TCP port: usually 1883, 8883 for TLS.")
    brokers: tuple[str, ...] = _key(
        (),
        broker_list,
        'The nodes of a clustered broker, as "host:port" ("[v6]:port" for IPv6); when set it '
        "replaces host and port. The agent starts at a random entry and moves to the next on "
        "a failed connect or a lost connection, keeping its client id and session (the "
        "cluster must replicate sessions), with jittered backoff once it has tried them all.",
    )
    topic_prefix: str = _key(
        "edge",
        topic_prefix,
        "First level(s) of every topic: <prefix>/nodes/<node.id>/... No '+', '#' or NUL, "
        "no leading, trailing or doubled '/', no leading '$'.",
    )
    client_id: str = _key(
        "",
        string(blanks=False),
        'MQTT client id; empty means "edge-agent-<node.id>", unique in the fleet. Leave it '
        "empty unless the broker assigns ids.",
    )
    keepalive: int = _key(
        30,
        integer(5, 3600),
        "Seconds between pings on an idle connection (5-3600). The broker sends the "
        "offline Last Will when it hears nothing for 1.5 times this.",
    )
    protocol: str = _key(
        "auto",
        protocol,
        'MQTT version: "auto" (MQTT 5, and 3.1.1 when the broker refuses 5: it answers '
        '"unsupported protocol version" or closes the connection during CONNECT), "5" or '
        '"3.1.1". The version used is logged at start.',
    )
    topic_charset: str = _key(
        "any",
        choice(*ids.TOPIC_CHARSETS),
        '"any": topics may hold any character MQTT allows. "portable": no "." or spaces '
        "in topic_prefix nor in the reply addresses requests name (answered bad_request), "
        "for brokers that map topics to subjects (NATS closes the connection on a publish "
        'to a topic with ".").',
    )
    retained_wildcards: str = _key(
        "auto",
        choice("auto", "yes", "no"),
        'Does the broker replay retained specs to wildcard subscriptions? "yes": MQTT says '
        'it must (Mosquitto, EMQX, NATS). "no": it does not (RabbitMQ before 3.13): the '
        "agent also follows the controller's retained spec indexes with exact-topic "
        'subscriptions. "auto": follow the indexes, subscribing only to specs the broker '
        'did not replay. Agents answer the controller\'s roll call unless "yes".',
    )
    username: str = _key("", string(), "Broker user name; empty for none.")
    password_file: str = _key(
        "",
        path(),
        "File holding the broker password; empty for none. The password itself never goes "
        "in this file.",
    )
    tls: bool = _key(
        False,
        flag,
        "Connect with TLS. Must be true when ca_file, cert_file, key_file or tls_insecure is set.",
    )
    ca_file: str = _key(
        "", path(), "CA certificates (PEM) to verify the broker; empty means the system store."
    )
    cert_file: str = _key(
        "", path(), "Client certificate (PEM) for mutual TLS; set it together with key_file."
    )
    key_file: str = _key("", path(), "Private key (PEM) of cert_file; set both or neither.")
    tls_insecure: bool = _key(
        False,
        flag,
        "Do not check the broker's host name against its certificate. For tests only: anyone "
        "holding any certificate that ca_file (or the system store) trusts can pose as the "
        "broker.",
    )
    reconnect_min_s: float = _key(
        0.5,
        number(exclusive=True),
        "Seconds before the first reconnect attempt after the connection drops; the delay "
        "doubles on each failure up to reconnect_max_s.",
    )
    reconnect_max_s: float = _key(
        60.0,
        number(exclusive=True),
        "Longest delay between reconnect attempts, in seconds (>= reconnect_min_s).",
    )
    session_expiry_s: int = _key(
        3600,
        integer(0, 2**32 - 1),
        "MQTT 5 only (ignored with 3.1.1): seconds the broker keeps this node's session and "
        "queued QoS 1 messages after a disconnect; 0 ends it at once.",
    )
    connect_timeout_s: float = _key(
        10.0,
        number(exclusive=True),
        "Seconds to wait for the broker to accept a connection before trying again.",
    )
    reply_prefixes: tuple[str, ...] = _key(
        (),
        reply_prefixes,
        "Where invocation replies may go (reply_to, MQTT 5 Response Topic), as plain topic "
        'prefixes (end one with "/" for a subtree). Empty: anywhere outside '
        "<prefix>/fleet, <prefix>/nodes and <prefix>/controllers. Set: only under these. "
        "The contract's reply topics (<prefix>/nodes/<node.id>/replies, "
        "<prefix>/controllers/<id>/replies) are always allowed; any other address is "
        "answered bad_request on <prefix>/nodes/<node.id>/replies.",
    )

    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """Where to connect, in the configured order: ``brokers``, else ``host:port``."""
        if self.brokers:
            return tuple(split_broker(entry) for entry in self.brokers)
        return ((self.host, self.port),)


@dataclass(frozen=True)
class AgentSettings:
    """``[agent]``: the agent process itself."""

    state_dir: str = _key(
        "/var/lib/edge-agent",
        path(required=True),
        "Directory of state.db (deployed functions, outbox, sync state) and of the unpacked "
        "function code. Use an absolute path.",
    )
    heartbeat_interval_s: float = _key(
        30.0, number(1.0), "Seconds between heartbeat messages (>= 1)."
    )
    max_payload_bytes: int = _key(
        262144,
        integer(1024, _MAX_MQTT_PAYLOAD),
        f"Largest MQTT payload accepted or published, in bytes (1024-{_MAX_MQTT_PAYLOAD}).",
    )
    max_spec_bytes: int = _key(
        1048576,
        integer(1024, _MAX_MQTT_PAYLOAD),
        "Largest function spec accepted, in bytes (1 MiB), checked before it is parsed; a "
        "bigger spec is rejected. Code too big for a spec comes by reference "
        "(code {url, sha256, size}). The agent announces max(max_payload_bytes, "
        "max_spec_bytes) plus header room as its MQTT 5 Maximum Packet Size, so a broker "
        "never sends it a bigger packet.",
    )
    log_level: str = _key(
        "info",
        choice("debug", "info", "warning", "error"),
        'Least severe log messages written: "debug", "info", "warning" or "error".',
    )
    shutdown_grace_s: float = _key(
        10.0,
        number(),
        "On stop, seconds running invocations get to finish before their workers are killed.",
    )
    dedupe_window_s: float = _key(
        600.0,
        number(),
        "Seconds a request_id is remembered, so an invoke the broker delivers twice (QoS 1) "
        "runs once.",
    )
    durability: str = _key(
        "normal",
        choice("normal", "full"),
        "How hard SQLite works to keep state.db on disk:\n"
        '  "normal" (synchronous=NORMAL, WAL): survives agent crashes and kill -9, but a '
        "power loss may lose the last few commits (a queued message, a recent deployment).\n"
        '  "full" (synchronous=FULL): fsyncs every commit, so nothing committed is lost on '
        "power loss, at the cost of more writes to the flash storage.",
    )


@dataclass(frozen=True)
class RuntimeConfig:
    """``[runtime]``: the worker processes that run invocations."""

    default_memory_mb: int = _key(
        128, integer(1), "Memory limit (MB) of a function whose spec sets none."
    )
    max_memory_mb: int = _key(
        1024,
        integer(1),
        "Largest memory_mb a function spec may ask for; a spec asking more is rejected.",
    )
    default_timeout_s: float = _key(
        30.0, number(exclusive=True), "Timeout (seconds) of a function whose spec sets none."
    )
    max_timeout_s: float = _key(
        900.0,
        number(exclusive=True),
        "Largest timeout_seconds a function spec may ask for; a spec asking more is rejected.",
    )
    max_workers: int = _key(
        8, integer(1), "Most worker processes alive at once, across all functions."
    )
    prestart: int = _key(
        1,
        integer(0, 16),
        "Generic interpreters started ahead of need, so a cold start only loads the handler "
        "(0-16, at most max_workers).",
    )
    max_queue: int = _key(
        64,
        integer(1),
        'Invocations that may wait per function; beyond that callers get "overloaded".',
    )
    function_uids: str = _key(
        "61000-61999",
        uid_range,
        "Each function's workers run under a uid (and gid) of its own from this range, so a "
        "function cannot read the agent's files, other functions' code or signal the agent. "
        "Needs root or CAP_SETUID+CAP_SETGID (the packaged unit grants them); without them, or "
        'with "", workers share one uid and status says "isolation": "shared-uid".',
    )
    worker_user: str = _key(
        "",
        string(blanks=False),
        "User (name or uid) the workers run as when function_uids is off or unavailable; "
        "empty runs them as the agent's own user. Switching users needs the agent to start "
        "as root.",
    )
    allow_file_code_urls: bool = _key(
        False,
        flag,
        "Accept code by reference at file:// URLs (tests, air-gapped installs that copy "
        "bundles in by other means); otherwise only https.",
    )
    max_processes: int = _key(
        64,
        integer(1),
        "Most processes and threads one function may run at once, all its workers together "
        "(RLIMIT_NPROC on its own uid, so only with function_uids); a spec's max_processes "
        "above this is rejected, a spec without one gets this.",
    )
    worker_python: str = _key(
        "",
        path(),
        "Interpreter the workers run (a Python 3.11+); empty: the agent's own. With "
        "function_uids, function users must be able to run it and read its standard library.",
    )
    worker_max_invocations: int = _key(
        10000,
        integer(1),
        "Replace a worker after this many invocations, bounding leaks in handlers.",
    )
    max_bundle_bytes: int = _key(
        52428800,
        integer(1),
        "Largest function code bundle, in bytes (50 MiB); a bigger deployment is rejected.",
    )
    max_bundle_files: int = _key(
        10000, integer(1), "Most files in one code bundle; a bigger deployment is rejected."
    )
    max_code_mb: int = _key(
        256,
        integer(1),
        "Most MB of installed function code on disk, all functions and kept versions "
        "together (after unpacking); a deployment that would go over is rejected.",
    )
    max_functions: int = _key(
        100, integer(1), "Most functions deployed at once; a spec for one more is rejected."
    )
    deploy_timeout_s: float = _key(
        30.0,
        number(10.0),
        "Deadline (seconds, at least 10) for test-loading a new version (importing its "
        'entrypoint); past it the version is "failed" and the old one keeps serving.',
    )
    deploy_parallel: int = _key(
        4,
        integer(1, 16),
        "Deployments prepared at once (unpack and test-load), one per function at a time, "
        "so a slow import never delays another function's deployment.",
    )


@dataclass(frozen=True)
class OutboxConfig:
    """``[outbox]``: messages kept in state.db while the broker is unreachable."""

    max_messages: int = _key(10000, integer(1), "Most messages held in the outbox.")
    max_bytes: int = _key(
        67108864,
        integer(1),
        "Most payload bytes held in the outbox (64 MiB; at least agent.max_payload_bytes).",
    )
    delta_linger_ms: float = _key(
        20.0,
        number(),
        "Milliseconds a state delta (sync/delta) waits before it is sent, while the next "
        "state changes merge into it: a burst of them costs one message per linger. The "
        "replies queued behind it do not wait. 0 sends each delta at once.",
    )


def key_files(value: Any) -> tuple[str, ...]:
    """A list of distinct absolute paths (public key files); the files are read at start."""
    if not isinstance(value, list | tuple):
        raise _Invalid("expected a list of absolute paths", value)
    items: list[str] = []
    for index, item in enumerate(value):
        try:
            text = path(required=True)(item)
        except _Invalid as exc:
            raise _Invalid(exc.problem, item, at=f"[{index}]") from None
        if not text.startswith("/"):
            raise _Invalid("expected an absolute path", item, at=f"[{index}]")
        if text in items:
            raise _Invalid("duplicate entry", item, at=f"[{index}]")
        items.append(text)
    return tuple(items)


@dataclass(frozen=True)
class TrustConfig:
    """``[trust]``: who may deploy code to this node (signed function specs)."""

    keys: tuple[str, ...] = _key(
        (),
        key_files,
        "ed25519 public keys (PEM files, as `edgectl keygen` writes them) whose signatures\n"
        "this node accepts on function specs; several at once for key rotation. Each file and\n"
        "its directory must not be writable by the agent's user or group, nor by anyone\n"
        "but root, or the agent refuses to start (exit 78). Removing a key and sending SIGHUP\n"
        "revokes it: the functions it signed stop. Empty: every spec is accepted unsigned, the\n"
        'agent warns at start and its status says "trust": "unsigned".',
    )
    require_signed: bool = _key(
        True,
        flag,
        "With keys set, refuse unsigned specs (the default). false accepts unsigned specs\n"
        "next to signed ones (signed ones are still checked in full): a migration mode.\n"
        "Without keys this setting has no effect.",
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration; see each section's class."""

    node: NodeConfig = field(metadata={"doc": "This gateway's identity, as the cloud sees it."})
    mqtt: MqttConfig = field(default_factory=MqttConfig, metadata={"doc": "The cloud broker."})
    agent: AgentSettings = field(
        default_factory=AgentSettings, metadata={"doc": "The agent process."}
    )
    runtime: RuntimeConfig = field(
        default_factory=RuntimeConfig, metadata={"doc": "Worker processes that run invocations."}
    )
    outbox: OutboxConfig = field(
        default_factory=OutboxConfig,
        metadata={"doc": "Messages kept in state.db while the broker is unreachable."},
    )
    trust: TrustConfig = field(
        default_factory=TrustConfig,
        metadata={"doc": "Who may deploy code here: keys that sign function specs."},
    )

    def __post_init__(self) -> None:
        client_id = effective_client_id(self.node.id, self.mqtt.client_id)
        if client_id != self.mqtt.client_id:
            object.__setattr__(self, "mqtt", replace(self.mqtt, client_id=client_id))


# --- parsing


def _hint(name: str, candidates: Mapping[str, str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {candidates[close[0]]}?)" if close else ""


#: Section name -> its dataclass, in file order.
SECTIONS: dict[str, type[Any]] = get_type_hints(Config)


def _convert_section(
    name: str, cls: type[Any], table: Mapping[str, Any], source: str, problems: list[str]
) -> dict[str, Any]:
    """Convert one section's keys, appending a line to ``problems`` for each bad one."""
    known = {f.name: f for f in fields(cls)}
    for key in table:
        if key not in known:
            hint = _hint(str(key), {k: f"{name}.{k}" for k in known})
            problems.append(f"{source}: {name}.{key}: unknown key{hint}")
    values: dict[str, Any] = {}
    for key, spec in known.items():
        if key not in table:
            if spec.default is MISSING:
                problems.append(f"{source}: {name}.{key}: required, but missing from [{name}]")
            continue
        try:
            values[key] = spec.metadata["convert"](table[key])
        except _Invalid as exc:
            where = f"{name}.{key}{exc.at}"
            problems.append(f"{source}: {where}: {exc.problem}, got {_show(exc.value)}")
    return values


def _check_relations(cfg: Config) -> list[str]:
    """Rules that tie keys together, as ``key: problem, got value`` lines."""
    mqtt, runtime = cfg.mqtt, cfg.runtime
    lines: list[str] = []

    def bad(key: str, problem: str, value: Any) -> None:
        lines.append(f"{key}: {problem}, got {_show(value)}")

    if not mqtt.tls:
        for key in ("ca_file", "cert_file", "key_file", "tls_insecure"):
            if getattr(mqtt, key):
                bad("mqtt.tls", f"must be true when mqtt.{key} is set", mqtt.tls)
    if bool(mqtt.cert_file) != bool(mqtt.key_file):
        missing, present = (
            ("key_file", "cert_file") if mqtt.cert_file else ("cert_file", "key_file")
        )
        bad(f"mqtt.{missing}", f"must be set together with mqtt.{present}", "")
    if mqtt.reconnect_max_s < mqtt.reconnect_min_s:
        bound = f"mqtt.reconnect_min_s ({mqtt.reconnect_min_s:g})"
        bad("mqtt.reconnect_max_s", f"expected a number >= {bound}", mqtt.reconnect_max_s)
    for index, start in enumerate(mqtt.reply_prefixes):
        for level in ("fleet", "nodes", "controllers"):
            owned = f"{mqtt.topic_prefix}/{level}"
            if start == owned or start.startswith(f"{owned}/"):
                need = f"must not fall under {owned}/ (the wire contract's topics)"
                bad(f"mqtt.reply_prefixes[{index}]", need, start)
    if mqtt.topic_charset == "portable":  # every topic the agent names must be portable
        need = 'must not contain "." or spaces with mqtt.topic_charset = "portable"'
        named = [("mqtt.topic_prefix", mqtt.topic_prefix)] + [
            (f"mqtt.reply_prefixes[{i}]", start) for i, start in enumerate(mqtt.reply_prefixes)
        ]
        for key, value in named:
            if ids.topic_charset_problem(value, "portable") is not None:
                bad(key, need, value)
    if mqtt.protocol == "3.1.1" and mqtt.password_file and not mqtt.username:
        # MQTT 3.1.1 forbids the password flag without the user name flag; 5 allows it.
        need = "MQTT 3.1.1 needs a user name when mqtt.password_file is set"
        bad("mqtt.username", need, mqtt.username)
    for kind in ("memory_mb", "timeout_s"):
        default, maximum = getattr(runtime, f"default_{kind}"), getattr(runtime, f"max_{kind}")
        if default > maximum:
            bad(
                f"runtime.default_{kind}",
                f"expected at most runtime.max_{kind} ({maximum})",
                default,
            )
    if runtime.prestart > runtime.max_workers:
        cap = f"expected at most runtime.max_workers ({runtime.max_workers})"
        bad("runtime.prestart", cap, runtime.prestart)
    if cfg.outbox.max_bytes < cfg.agent.max_payload_bytes:
        floor = f"expected at least agent.max_payload_bytes ({cfg.agent.max_payload_bytes})"
        bad("outbox.max_bytes", floor, cfg.outbox.max_bytes)
    return lines


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate parsed TOML into a :class:`Config`; every problem in one ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table of sections, got {_show(data)}")
    # A stray top-level key is usually a key written above its [section] header.
    top_level = {name: f"[{name}]" for name in SECTIONS}
    for name, cls in SECTIONS.items():
        for spec in fields(cls):
            top_level.setdefault(spec.name, f"{name}.{spec.name}")
    problems: list[str] = []
    for name, value in data.items():
        if name not in SECTIONS:
            kind = "unknown section" if isinstance(value, Mapping) else "unknown key"
            problems.append(f"{source}: {name}: {kind}{_hint(str(name), top_level)}")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, Mapping):
            problems.append(f"{source}: {name}: expected a table [{name}], got {_show(table)}")
            continue
        values = _convert_section(name, cls, table, source, problems)
        if not problems:
            sections[name] = cls(**values)
    if not problems:
        cfg = Config(**sections)
        problems = [f"{source}: {line}" for line in _check_relations(cfg)]
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate the TOML file at ``path``; any failure is a ConfigError."""
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8-sig"))  # -sig: tolerate an editor's BOM
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (bad byte at offset {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    return parse_config(data, source)


# --- writing


def _toml_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The effective config as plain TOML data (``tomli_w.dumps`` writes it; no None)."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        section = getattr(cfg, name)
        out[name] = {f.name: _toml_value(getattr(section, f.name)) for f in fields(section)}
    return out


def _comment(doc: str) -> list[str]:
    """``doc`` as comment lines; a line starting with spaces keeps them on its wrapped lines."""
    lines = []
    for para in doc.split("\n"):
        indent = " " * (len(para) - len(para.lstrip(" ")))
        lines += textwrap.wrap(
            para.lstrip(" "), 88, initial_indent=indent, subsequent_indent=indent + "  "
        )
    return ["# " + line for line in lines]


_HEADER = (
    "edge-agent configuration, normally /etc/edge-agent/agent.toml (root:edge-agent, 0640).\n"
    "Every key is listed with its default value; unknown keys are errors. Only node.id is\n"
    "required. Durations are in seconds and may be written as integers or decimals."
)


def render_default_config(node_id: str = EXAMPLE_NODE_ID) -> str:
    """The annotated default file: every key with its default, a comment above each."""
    try:
        identifier(node_id)
    except _Invalid as exc:
        raise ConfigError(f"node.id: {exc.problem}, got {_show(node_id)}") from None
    lines = _comment(_HEADER)
    for section in fields(Config):
        lines += ["", *_comment(section.metadata["doc"]), f"[{section.name}]"]
        for n, spec in enumerate(fields(SECTIONS[section.name])):
            # Raw defaults, not effective values: a copied file must not pin client_id or
            # name to the example node's id.
            default = node_id if spec.default is MISSING else spec.default
            setting = tomli_w.dumps({spec.name: _toml_value(default)}).rstrip("\n")
            lines += [""] * (n > 0) + _comment(spec.metadata["doc"]) + [setting]
    return "\n".join(lines) + "\n"


def write_default_config(path: str | Path, *, node_id: str = EXAMPLE_NODE_ID) -> None:
    """Write the annotated default file to ``path``; FileExistsError if anything is there."""
    text = render_default_config(node_id)
    # O_EXCL refuses an existing file and a symlink alike; 0640 as DESIGN.md asks.
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
