"""``edgectl``'s argument parser: the connection flags (accepted before or after the
command, defaults from ``EDGECTL_*``) and one subparser per command, each bound to its
``cmd_<name>`` function.

Must never: connect, or read files (commands do, so a bad path is a usage error there).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from agent import __version__
from agent.cloud.ctl.commands import (
    cmd_deploy,
    cmd_desired,
    cmd_invoke,
    cmd_nodes,
    cmd_state,
    cmd_undeploy,
)
from agent.cloud.ctl.common import env
from agent.cloud.ctl.keys import cmd_acl, cmd_keygen
from agent.contract import protocol


def _connection_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The shared flags; on subcommands their defaults are SUPPRESS so the top's stand."""

    def d(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    g = parser.add_argument_group("connection")
    g.add_argument(
        "--broker",
        action="append",
        default=d(None),
        metavar="HOST:PORT",
        help="MQTT broker; repeat it or give a comma list for the nodes of a cluster (tried "
        "from a random one, then the next; env EDGECTL_BROKER, default 127.0.0.1:1883)",
    )
    g.add_argument(
        "--prefix", default=d(env("PREFIX", "edge")), help="topic prefix (env EDGECTL_PREFIX)"
    )
    g.add_argument(
        "--tls",
        action="store_true",
        default=d(env("TLS", "") in ("1", "true", "yes")),
        help="connect with TLS (env EDGECTL_TLS=1)",
    )
    g.add_argument("--ca-file", default=d(env("CA_FILE", "")), help="CA bundle (PEM)")
    g.add_argument("--cert-file", default=d(env("CERT_FILE", "")), help="client certificate")
    g.add_argument("--key-file", default=d(env("KEY_FILE", "")), help="client key")
    g.add_argument("--username", default=d(env("USERNAME", "")), help="broker user name")
    g.add_argument(
        "--password-file", default=d(env("PASSWORD_FILE", "")), help="file holding the password"
    )
    g.add_argument("--protocol", choices=("5", "3.1.1"), default=d("5"), help="MQTT version")
    g.add_argument(
        "--connect-timeout",
        type=float,
        default=d(10.0),
        metavar="S",
        help="give up on the broker after S seconds (exit 3; default 10)",
    )
    g.add_argument(
        "--heartbeat-interval",
        type=float,
        default=d(float(env("HEARTBEAT_INTERVAL", "30"))),
        metavar="S",
        help="the agents' heartbeat interval: 3 missed is OFFLINE (default 30)",
    )
    g.add_argument(
        "--retained-wildcards",
        choices=protocol.RETAINED_WILDCARDS,
        default=d(env("RETAINED_WILDCARDS", "auto")),
        help="does the broker replay retained messages to wildcard subscriptions? no: "
        "RabbitMQ before 3.13 (spec indexes and a roll call); auto: probe (default; env "
        "EDGECTL_RETAINED_WILDCARDS)",
    )
    g.add_argument(
        "--rollcall-window",
        type=float,
        default=d(float(env("ROLLCALL_WINDOW", "2"))),
        metavar="S",
        help="without retained wildcards: how long the nodes take to answer the roll call "
        "(they spread their answers over it; default 2)",
    )
    g.add_argument("--json", action="store_true", default=d(False), help="JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgectl",
        description="Operate an edge-agent fleet over MQTT.",
        epilog="exit codes: 0 ok, 1 operation failed, 2 usage, 3 broker unreachable, 4 timeout",
    )
    parser.add_argument("--version", action="version", version=f"edgectl {__version__}")
    _connection_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> Any:
        p = sub.add_parser(name, help=help, description=help)
        _connection_flags(p, top=False)
        p.set_defaults(func=func)
        return p

    p = command("nodes", "list the fleet's nodes", cmd_nodes)
    p.add_argument("--status", choices=["online", "offline", "degraded", "syncing"])
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="listen S seconds first to collect heartbeats (CPU, memory, outbox)",
    )

    p = command("deploy", "deploy code (a .py, a .zip or a directory)", cmd_deploy)
    p.add_argument("path", help="a module file, a zip bundle or a directory")
    p.add_argument("--id", required=True, help="function id")
    p.add_argument("--entrypoint", help='"module:attr" (a .py file defaults to <stem>:handler)')
    p.add_argument("--name", help="display name (default: the id)")
    p.add_argument("--version", help="version (default: the first 12 hex of the code's sha256)")
    p.add_argument("--memory-mb", type=int, default=128)
    p.add_argument("--timeout-seconds", type=float, default=30.0)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--requires", action="append", default=[], metavar="CAP")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--fleet", action="store_true", help="every node (the retained fleet spec)")
    target.add_argument("--node", action="append", help="this node only (repeatable)")
    p.add_argument("--canary", help="canaries first: a count (3) or a percentage (10%%)")
    p.add_argument("--max-failures", type=int, default=0, help="canary failures tolerated")
    p.add_argument("--canary-timeout", type=float, default=60.0, metavar="S")
    p.add_argument("--wait", type=float, default=120.0, metavar="S", help="rollout deadline")
    p.add_argument("--no-wait", action="store_true", help="publish and exit")
    p.add_argument(
        "--sign-key",
        default=env("SIGN_KEY", ""),
        metavar="PATH",
        help="sign every spec with this private key (env EDGECTL_SIGN_KEY; edgectl keygen)",
    )
    p.add_argument(
        "--sequence",
        type=int,
        metavar="N",
        help="the signed spec's sequence, when the default (ms clock) is not above the last",
    )

    p = command("undeploy", "clear a function's spec", cmd_undeploy)
    p.add_argument("function_id")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--fleet", action="store_true", help="the fleet spec")
    target.add_argument("--node", help="this node's own spec")

    p = command("invoke", "invoke a function on a node", cmd_invoke)
    p.add_argument("node")
    p.add_argument("function_id")
    p.add_argument("--payload", default="null", help="JSON payload (default null)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="reply deadline")

    p = command("state", "a node's synchronised state (asks it for a snapshot)", cmd_state)
    p.add_argument("node")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S")

    p = command("desired", "publish a node's next desired state", cmd_desired)
    p.add_argument("node")
    p.add_argument("--set", required=True, metavar="JSON", help="the desired data (an object)")

    p = command("keygen", "write an ed25519 signing key pair: PATH and PATH.pub", cmd_keygen)
    p.add_argument("path", help="where the private key goes (mode 0600); PATH.pub: public")

    p = command("acl", "print a reference broker ACL", cmd_acl)
    p.add_argument("broker_kind", choices=["mosquitto"], help="the broker's ACL format")
    p.add_argument("--nodes", default="", help="node ids, comma-separated (their user names)")
    p.add_argument("--controllers", required=True, help="controller user names, comma-separated")
    return parser
