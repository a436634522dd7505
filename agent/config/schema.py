"""The frozen :class:`Config` tree and the one table that knows every key.

Each dataclass field carries its default, its converter (:mod:`.convert`) and the comment
written above it in the default file (:mod:`.render`), so code and file cannot drift.

A ``Config`` holds *effective* values: ``node.name`` is filled from ``node.id`` and
``mqtt.client_id`` from :func:`effective_client_id` when left empty.

Must never: read or write files, or check rules that tie keys together (:mod:`.load` does,
after every key has passed its own converter).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, get_type_hints

from agent.config.convert import (
    Convert,
    broker_list,
    choice,
    flag,
    identifier,
    integer,
    key_files,
    number,
    path,
    protocol,
    reply_prefixes,
    split_broker,
    string,
    string_list,
    topic_prefix,
    uid_range,
    word,
)
from agent.contract import ids

_MAX_MQTT_PAYLOAD = 268_435_455  # the largest remaining length an MQTT packet can declare


def effective_client_id(node_id: str, client_id: str = "") -> str:
    """The MQTT client id to connect with: ``client_id``, or ``edge-agent-<node_id>``."""
    return client_id or f"edge-agent-{node_id}"


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

    host: str = _key("127.0.0.1", word, "Broker host name or IP address.")
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
    record_accepted_after_s: float = _key(
        1.0,
        number(),
        "Seconds an invocation may run before the agent records it on disk and acknowledges "
        "it to the broker, so that a broker with an ack deadline (NATS: ack_wait, 30 s) does "
        "not deliver it again while it runs, and a restarted agent runs it again. One that "
        "finishes sooner is acknowledged with its reply, without that write (a crash before "
        "then means the broker delivers it again). Keep it well under the broker's ack "
        "deadline; 0 records every invocation as it is accepted.",
    )
    commit_delay_ms: float = _key(
        1.0,
        number(),
        "Under load (calls queued behind running ones), the longest a finished invocation's "
        "reply waits for others to finish, so that one transaction and one publish round "
        "carry several replies (group commit). One call at a time never waits. 0: every "
        "answer is committed as soon as the loop reads it.",
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


#: Section name -> its dataclass, in file order.
SECTIONS: dict[str, type[Any]] = get_type_hints(Config)
