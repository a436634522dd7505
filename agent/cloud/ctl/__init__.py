"""``edgectl``: the operator's command line for a fleet, on top of ``agent.cloud``.

    edgectl nodes                                   table of nodes (id, status, last seen, ...)
    edgectl deploy PATH --id ID --fleet [--canary 10%]   publish a spec, follow the rollout
    edgectl deploy PATH --id ID --node gw-1         one node's own spec
    edgectl undeploy ID (--fleet | --node N)        clear a spec
    edgectl invoke NODE FUNCTION --payload JSON     request/response over MQTT
    edgectl state NODE                              the node's synchronised state (snapshot)
    edgectl desired NODE --set JSON                 publish the next desired state
    edgectl keygen PATH                             a signing key pair: PATH (0600), PATH.pub
    edgectl acl mosquitto --nodes a,b --controllers c   a reference broker ACL, on stdout

Signing: ``--sign-key PATH`` (``EDGECTL_SIGN_KEY``) on ``deploy`` signs every spec it
publishes, canaries and rollbacks included, for its target (``fleet`` or the node) with a
new ``sequence`` (see ``FleetController.next_sequence``). Agents with ``[trust] keys``
refuse specs that are not signed by one of them.

Connection flags work before or after the command; their defaults come from the
environment: ``--broker HOST:PORT`` (repeatable, or a comma list: the nodes of a clustered
broker; ``EDGECTL_BROKER``, default 127.0.0.1:1883),
``--prefix`` (``EDGECTL_PREFIX``, default edge), ``--tls`` (``EDGECTL_TLS=1``),
``--ca-file``/``--cert-file``/``--key-file`` (``EDGECTL_CA_FILE``, ...), ``--username``
(``EDGECTL_USERNAME``), ``--password-file`` (``EDGECTL_PASSWORD_FILE``),
``--heartbeat-interval`` (``EDGECTL_HEARTBEAT_INTERVAL``, the agents' interval, default 30),
``--retained-wildcards auto|yes|no`` (``EDGECTL_RETAINED_WILDCARDS``: brokers that replay no
retained messages to wildcard filters, RabbitMQ before 3.13, need "no", which "auto" detects)
and ``--rollcall-window`` (``EDGECTL_ROLLCALL_WINDOW``, the nodes' answer window there).
``--json`` prints one JSON document on stdout instead of tables.

Exit codes, for scripts: 0 ok; 1 the operation failed (a deploy rejected or failed on some
node, a canary rollback, an invoke error, nothing to undeploy); 2 usage (bad flags, bad
JSON, unusable code or TLS files); 3 the broker is unreachable (or did not acknowledge);
4 timeout (a rollout not finished, or no reply, by the deadline).

The package, imports pointing down the list::

    __init__.py  main(): parse, run the command, map exceptions to exit codes
    parser.py    argparse: the connection flags and one subparser per command
    keys.py      keygen and acl (offline: no broker)
    commands.py  nodes, deploy, undeploy, invoke, state, desired
    render.py    JSON documents, rich tables and progress (rich loads lazily)
    connect.py   flags -> MqttSettings, and the command's one FleetController
    common.py    exit codes, UsageError, the EDGECTL_* environment

The composition root for the cloud side: nothing in ``agent`` imports this package. Names
re-exported here for tests and scripts: ``main``, the ``EXIT_*`` codes, ``UsageError``,
``build_parser``, ``settings_from``, ``parse_broker(s)``, ``connect``, ``node_rows`` and
``mosquitto_acl``.
"""

from __future__ import annotations

import sys
import time

from agent.cloud.ctl.commands import node_rows
from agent.cloud.ctl.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UsageError,
)
from agent.cloud.ctl.connect import connect, parse_broker, parse_brokers, settings_from
from agent.cloud.ctl.keys import mosquitto_acl
from agent.cloud.ctl.parser import build_parser
from agent.errors import AgentError, BrokerUnreachable, ConfigError, PublishRefused
from agent.mqtt import PROTOCOL_REFUSED

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "connect",
    "main",
    "mosquitto_acl",
    "node_rows",
    "parse_broker",
    "parse_brokers",
    "settings_from",
]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        return int(args.func(args))
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"edgectl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"edgectl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PublishRefused as exc:  # reached, but not allowed (the broker's ACL): a failure
        print(f"edgectl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokerUnreachable as exc:
        hint = ""
        if PROTOCOL_REFUSED in str(exc) and getattr(args, "protocol", "") == "5":
            hint = " (the broker speaks MQTT 3.1.1 only: try --protocol 3.1.1)"
        print(f"edgectl: {exc}{hint}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except AgentError as exc:
        print(f"edgectl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"edgectl: interrupted after {time.monotonic() - started:.1f}s", file=sys.stderr)
        return 130
