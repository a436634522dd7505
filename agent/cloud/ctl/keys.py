"""``edgectl``'s offline trust commands: ``keygen`` (a signing key pair for ``deploy
--sign-key``) and ``acl`` (a reference broker ACL on stdout).

Must never: connect to a broker, or overwrite a key file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent.cloud.ctl.common import EXIT_OK, UsageError
from agent.cloud.ctl.render import emit_json
from agent.contract import protocol
from agent.trust import generate_keypair


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        kid = generate_keypair(args.path)
    except OSError as exc:  # FileExistsError included: never overwrite a key
        raise UsageError(f"keygen: {exc}") from exc
    if args.json:
        emit_json({"key_id": kid, "private": args.path, "public": f"{args.path}.pub"})
    else:
        print(f"key {kid}: private key {args.path} (keep it secret), public key {args.path}.pub")
        print(f'give {args.path}.pub to the agents: [trust] keys = ["/etc/edge-agent/trust/..."]')
    return EXIT_OK


def _ids(flag: str, value: str) -> list[str]:
    ids = [item.strip() for item in value.split(",") if item.strip()]
    for item in ids:
        if not protocol.is_valid_id(item):
            raise UsageError(f"{flag}: not an id: {item!r}")
    return ids


def mosquitto_acl(prefix: str, nodes: Sequence[str], controllers: Sequence[str]) -> str:
    """A Mosquitto ``acl_file``: each node (user name = node id) publishes only its own
    status, heartbeat, replies, function states and sync messages (and replies to
    controllers) and reads the fleet specs and its own topics; only controllers publish
    specs, invocations and desired state, and they read everything under the prefix."""
    p = prefix
    lines = [
        f"# Mosquitto ACL for edge-agent under {p}/ (edgectl acl mosquitto).",
        "# Use it with password_file (a user per node, named as the node id, and per",
        "# controller) and allow_anonymous false. No line comes before the first `user`,",
        "# so anonymous clients, if allowed at all, may neither publish nor subscribe.",
    ]
    for name in controllers:
        lines += [
            "",
            f"# controller {name}: reads the whole fleet; publishes specs, invokes, desired",
            f"user {name}",
            f"topic readwrite {p}/#",
        ]
    for node in nodes:
        n = f"{p}/nodes/{node}"
        lines += [
            "",
            f"# node {node}",
            f"user {node}",
            f"topic write {n}/status",
            f"topic write {n}/heartbeat",
            f"topic write {n}/replies",
            f"topic write {n}/functions/+/state",
            f"topic write {n}/sync/delta",
            f"topic write {n}/sync/snapshot",
            f"topic write {p}/controllers/+/replies",
            f"topic read {p}/fleet/functions/+",
            f"topic read {p}/fleet/index",
            f"topic read {p}/fleet/rollcall",
            f"topic read {n}/functions/+",
            f"topic read {n}/index",
            f"topic read {n}/invoke",
            f"topic read {n}/sync/desired",
            f"topic read {n}/sync/request",
        ]
    return "\n".join(lines) + "\n"


def cmd_acl(args: argparse.Namespace) -> int:
    if not protocol.is_valid_prefix(args.prefix):
        raise UsageError(f"--prefix: not a usable topic prefix: {args.prefix!r}")
    nodes = _ids("--nodes", args.nodes)
    controllers = _ids("--controllers", args.controllers)
    if not controllers:
        raise UsageError("--controllers: at least one controller user is needed")
    clash = set(nodes) & set(controllers)
    if clash:
        raise UsageError(f"--nodes and --controllers share {', '.join(sorted(clash))}")
    sys.stdout.write(mosquitto_acl(args.prefix, nodes, controllers))
    return EXIT_OK
