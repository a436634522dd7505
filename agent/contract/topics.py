"""The topic names of the wire contract: one node's (:class:`Topics`), the fleet's
(:class:`FleetTopics`), and where a reply may go (:func:`reply_address_problem`).

Owns every topic string the agent (and the cloud-side controller) publishes or subscribes to:
``<prefix>/nodes/<node>/...``, ``<prefix>/fleet/...`` and the controllers' reply topics, how
an incoming topic is classified, and which namespaces under the prefix belong to the
contract. The rules for ids and prefixes themselves are :mod:`agent.contract.ids`'s.

Must never: do I/O, or import anything beyond the stdlib and ``agent.contract``'s pure modules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from agent.contract.fields import require_id, require_prefix, show
from agent.contract.ids import is_valid_id, is_valid_publish_topic, topic_charset_problem

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

FleetTopicKind = Literal[
    "status", "heartbeat", "function_state", "sync_delta", "sync_snapshot", "replies", "unknown"
]


@dataclass(frozen=True)
class Topics:
    """The topics of one node, as the agent on that node uses them."""

    prefix: str
    node_id: str

    def __post_init__(self) -> None:
        require_prefix(self.prefix)
        require_id("node id", self.node_id)

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
        return f"{self._node}/functions/{require_id('function id', fid)}"

    def fleet_function(self, fid: str) -> str:
        return f"{self.prefix}/fleet/functions/{require_id('function id', fid)}"

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
                return ReplyAddress(self.replies, f"{what} {show(topic)}: {problem}")
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
            return None if is_valid_id(rest[1]) else f"{show(rest[1])} is no controller id"
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
        require_prefix(self.prefix)

    def node(self, node_id: str) -> Topics:
        return Topics(self.prefix, node_id)

    def fleet_function(self, fid: str) -> str:
        return f"{self.prefix}/fleet/functions/{require_id('function id', fid)}"

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
