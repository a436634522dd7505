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

The composition root for the cloud side: nothing imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from agent import __version__
from agent.cloud import (
    BrokerUnreachable,
    FleetController,
    PublishRefused,
    ReplyTimeout,
    RolloutReport,
    StagedRollout,
    function_spec,
)
from agent.config import split_broker
from agent.contract import protocol
from agent.errors import AgentError, ConfigError, DeploymentRejected, EdgeExecutionError
from agent.local.cluster import EdgeCluster
from agent.mqtt import PROTOCOL_REFUSED, MqttSettings
from agent.trust import Signer, generate_keypair

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4


class UsageError(Exception):
    """Bad input from the command line (exit 2)."""


# -- connection -------------------------------------------------------------------------------


def parse_broker(value: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port); port defaults to 1883."""
    try:
        return split_broker(value)
    except ValueError as exc:
        raise UsageError(f"--broker: {exc}, got {value!r}") from None


def parse_brokers(values: Sequence[str] | str | None) -> tuple[tuple[str, int], ...]:
    """Every ``--broker`` (repeated, or comma lists), else ``EDGECTL_BROKER``, deduplicated."""
    if values is None:
        values = [_env("BROKER", "127.0.0.1:1883")]
    elif isinstance(values, str):
        values = [values]
    entries = [item.strip() for value in values for item in value.split(",") if item.strip()]
    if not entries:
        raise UsageError("--broker: expected HOST:PORT")
    return tuple(dict.fromkeys(parse_broker(entry) for entry in entries))


def settings_from(args: argparse.Namespace) -> MqttSettings:
    brokers = parse_brokers(args.broker)
    host, port = brokers[0]
    return MqttSettings.for_controller(
        host,
        port,
        brokers=brokers if len(brokers) > 1 else (),
        one_shot=True,  # one command an operator waits on: short reconnect backoff
        timeout_s=args.connect_timeout,
        protocol=args.protocol,
        username=args.username,
        password_file=args.password_file,
        tls=args.tls,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
    )


def connect(
    args: argparse.Namespace,
    *,
    extra_subscriptions: Sequence[str] = (),
    on_message: Callable[[str, bytes], None] | None = None,
) -> EdgeCluster:
    sign_key = getattr(args, "sign_key", "")
    signer = Signer.from_file(sign_key) if sign_key else None  # ConfigError: exit 2
    controller = FleetController(
        settings_from(args),
        prefix=args.prefix,
        heartbeat_interval_s=args.heartbeat_interval,
        extra_subscriptions=extra_subscriptions,
        on_message=on_message,
        signer=signer,
        # One-shot with a clean session: QoS 1 would only matter across a reconnect, which
        # a clean session does not survive anyway; QoS 0 keeps NATS from creating a
        # replicated JetStream consumer per filter (seconds, and impossible mid-election).
        view_qos=0,
        reply_qos=0,
        retained_wildcards=args.retained_wildcards,
        rollcall_window_s=args.rollcall_window,
    )
    controller.start(args.connect_timeout)
    return EdgeCluster(controller=controller)


def _consoles(args: argparse.Namespace) -> tuple[Any, Any]:
    from rich.console import Console

    # Piped output is still read by people; 80 columns would fold the node table.
    out_width = None if sys.stdout.isatty() else 160
    err_width = None if sys.stderr.isatty() else 160
    return (
        Console(width=out_width, highlight=False),
        Console(stderr=True, width=err_width, highlight=False),
    )


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# -- nodes ------------------------------------------------------------------------------------


def node_rows(cluster: EdgeCluster, status: str | None) -> list[dict[str, Any]]:
    from agent.models import EdgeNodeStatus

    wanted = EdgeNodeStatus(status) if status else None
    controller = cluster.controller
    rows = []
    for node in cluster.list_nodes(wanted):
        meta = node.metadata
        system = meta.get("system") or {}
        outbox = meta.get("outbox") or {}
        rows.append(
            {
                "id": node.id,
                "status": node.status.value,
                "last_seen": node.last_heartbeat.isoformat(timespec="seconds"),
                "cpu_percent": system.get("cpu_percent"),
                "memory_used_mb": system.get("memory_used_mb"),
                "memory_total_mb": system.get("memory_total_mb"),
                "functions": controller.active_functions(node.id),
                "outbox": outbox.get("messages"),
                "capabilities": node.capabilities,
                "agent_version": meta.get("agent_version"),
                "offline_reason": meta.get("offline_reason"),
            }
        )
    return rows


def _ago(iso: str) -> str:
    seconds = max(0.0, (datetime.now() - datetime.fromisoformat(iso)).total_seconds())
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _dash(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def cmd_nodes(args: argparse.Namespace) -> int:
    with connect(args) as cluster:
        if args.wait > 0:  # collect a heartbeat from every node (CPU, memory, outbox)
            threading.Event().wait(args.wait)
        rows = node_rows(cluster, args.status)
    if args.json:
        emit_json(rows)
        return EXIT_OK
    from rich import box
    from rich.table import Table
    from rich.text import Text

    out, _ = _consoles(args)
    colours = {"online": "green", "offline": "red", "degraded": "yellow", "syncing": "cyan"}
    # Rich measures every cell: plain Text cells and a light box keep 1,000 rows near 1 s.
    table = Table(
        title=f"{len(rows)} nodes under {args.prefix}/",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for name in ("node", "status", "last seen", "cpu", "memory", "functions", "outbox"):
        right = name in ("cpu", "outbox")
        table.add_column(name, justify="right" if right else "left", no_wrap=name != "functions")
    for row in rows:
        memory = (
            "-"
            if row["memory_used_mb"] is None
            else f"{row['memory_used_mb']:.0f}/{row['memory_total_mb']:.0f} MB"
        )
        status = row["status"]
        table.add_row(
            row["id"],
            Text(status, style=colours.get(status, "")),
            _ago(row["last_seen"]),
            _dash(row["cpu_percent"], "{:.1f}%"),
            memory,
            ", ".join(row["functions"]) or "-",
            _dash(row["outbox"]),
        )
    out.print(table)
    return EXIT_OK


# -- deploy / undeploy ------------------------------------------------------------------------


def _environment(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env: expected KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _progress_printer(args: argparse.Namespace) -> tuple[Any, Callable[[str, RolloutReport], None]]:
    """A rich progress display (stderr) and the callback that feeds it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    _, err = _consoles(args)
    progress = Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=err,
    )
    tasks: dict[str, Any] = {}

    def on_progress(phase: str, report: RolloutReport) -> None:
        counts = report.counts()
        total = len(report.results)
        text = "  ".join(f"{k} {v}" for k, v in counts.items() if v)
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total, counts=text)
        progress.update(tasks[phase], completed=total - counts["pending"], counts=text)

    return progress, on_progress


def _report_problems(args: argparse.Namespace, report: RolloutReport, title: str) -> None:
    from rich.table import Table

    bad = [r for r in report.results.values() if r.state != "active"]
    if not bad:
        return
    _, err = _consoles(args)
    table = Table(title=title, title_justify="left")
    for name in ("node", "result", "serving"):
        table.add_column(name, no_wrap=True)
    table.add_column("error", overflow="fold")
    for result in sorted(bad, key=lambda r: (r.state, r.node_id))[:20]:
        error = result.error or {}
        message = f"{error.get('type', '')}: {error.get('message', '')}" if error else ""
        table.add_row(result.node_id, result.state, result.active_version or "-", message)
    err.print(table)
    if len(bad) > 20:
        err.print(f"... and {len(bad) - 20} more")


def _exit_for(report: RolloutReport) -> int:
    counts = report.counts()
    if counts["rejected"] or counts["failed"]:
        return EXIT_FAILED
    if not report.ok:
        return EXIT_TIMEOUT  # pending at the deadline, or offline: not confirmed
    return EXIT_OK


def cmd_deploy(args: argparse.Namespace) -> int:
    if args.canary and not args.fleet:
        raise UsageError("--canary needs --fleet (canaries first, then the fleet)")
    try:
        spec = function_spec(
            args.path,
            id=args.id,
            entrypoint=args.entrypoint,
            name=args.name,
            version=args.version,
            memory_mb=args.memory_mb,
            timeout_seconds=args.timeout_seconds,
            environment=_environment(args.env),
            requires=args.requires,
            concurrency=args.concurrency,
        )
    except (DeploymentRejected, OSError) as exc:
        raise UsageError(str(exc)) from exc
    if args.sequence is not None:
        if not args.sign_key:
            raise UsageError("--sequence needs --sign-key (only signed specs carry one)")
        spec = replace(spec, sequence=args.sequence)
    with connect(args) as cluster:
        controller = cluster.controller
        if args.canary:
            return _deploy_staged(args, cluster, spec)
        if args.fleet and not args.no_wait and not controller.targets(spec):
            known = len(cluster.list_nodes())
            print(
                f"edgectl: no node would deploy {spec.id} {spec.version}: {known} nodes known "
                f"under {args.prefix}/, none of them online"
                + (f" with {', '.join(spec.requires)}" if spec.requires else "")
                + "; nothing was published (--no-wait publishes the fleet spec anyway, for "
                "nodes that come later)",
                file=sys.stderr,
            )
            return EXIT_FAILED
        if args.fleet:
            targets = controller.deploy_fleet(spec)
        else:
            targets = controller.deploy_nodes(spec, args.node)
        where = "the fleet" if args.fleet else ", ".join(targets)
        if args.no_wait:
            if args.json:
                emit_json({"function_id": spec.id, "version": spec.version, "targets": targets})
            else:
                print(f"published {spec.id} {spec.version} to {where} ({len(targets)} nodes)")
            return EXIT_OK
        if args.json:
            report = controller.wait_rollout(spec, targets, args.wait)
        else:
            _, err = _consoles(args)
            err.print(f"deploying {spec.id} {spec.version} to {where}: {len(targets)} nodes")
            progress, on_progress = _progress_printer(args)
            with progress:
                report = controller.wait_rollout(spec, targets, args.wait, on_progress)
    if args.json:
        emit_json(report.to_dict())
    else:
        _report_problems(args, report, "nodes not active")
        print(_summary(report))
    return _exit_for(report)


def _summary(report: RolloutReport) -> str:
    counts = "  ".join(f"{k} {v}" for k, v in report.counts().items() if v) or "no nodes"
    late = " (deadline passed)" if report.timed_out else ""
    return f"{report.function_id} {report.version}: {counts} in {report.elapsed_s:.1f}s{late}"


def _deploy_staged(args: argparse.Namespace, cluster: EdgeCluster, spec: Any) -> int:
    from agent.cloud import canary_count

    canary: str | int = int(args.canary) if args.canary.isdigit() else args.canary
    try:
        canary_count(canary, 1)  # only to check the flag before anything is published
    except ValueError as exc:
        raise UsageError(f"--canary: {exc}") from exc
    kwargs: dict[str, Any] = {
        "canary": canary,
        "max_failures": args.max_failures,
        "canary_timeout": args.canary_timeout,
        "timeout": args.wait,
    }
    if args.json:
        result = cluster.rollout(spec, **kwargs)
    else:
        progress, on_progress = _progress_printer(args)
        with progress:
            result = cluster.rollout(spec, on_progress=on_progress, **kwargs)
    return _staged_outcome(args, result)


def _staged_outcome(args: argparse.Namespace, result: StagedRollout) -> int:
    if args.json:
        emit_json(result.to_dict())
    else:
        print(f"canaries: {', '.join(result.canaries)}")
        print(f"  {_summary(result.canary)}")
        for note in result.notes:
            print(f"  {note}")
        if result.rolled_back:
            _report_problems(args, result.canary, "canaries not active")
            if result.rollback is not None:
                print(f"rolled back: {_summary(result.rollback)}")
            else:
                print("rolled back: the canaries had no previous version (function removed)")
        elif result.fleet is not None:
            _report_problems(args, result.fleet, "nodes not active")
            print(f"fleet: {_summary(result.fleet)}")
    if result.rolled_back:
        return EXIT_FAILED
    assert result.fleet is not None
    return _exit_for(result.fleet)


def cmd_undeploy(args: argparse.Namespace) -> int:
    with connect(args) as cluster:
        had = cluster.undeploy(args.function_id, None if args.fleet else args.node)
    scope = "fleet" if args.fleet else f"node {args.node}"
    if args.json:
        emit_json({"function_id": args.function_id, "scope": scope, "had_spec": had})
    elif had:
        print(f"cleared the {scope} spec of {args.function_id}")
    else:
        print(f"edgectl: no {scope} spec of {args.function_id} to clear", file=sys.stderr)
    return EXIT_OK if had else EXIT_FAILED


# -- invoke -----------------------------------------------------------------------------------


def _json_arg(flag: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag}: not JSON: {exc}") from exc


def cmd_invoke(args: argparse.Namespace) -> int:
    payload = _json_arg("--payload", args.payload)
    with connect(args) as cluster:
        if cluster.get_node(args.node) is None:
            print(f"edgectl: warning: {args.node} is not a known node", file=sys.stderr)
        try:
            result = cluster.controller.invoke(
                args.node, args.function_id, payload, timeout=args.timeout
            )
        except ReplyTimeout as exc:
            return _invoke_error(args, exc, EXIT_TIMEOUT)
        except EdgeExecutionError as exc:
            return _invoke_error(args, exc, EXIT_FAILED)
    if args.json:
        emit_json(
            {
                "ok": True,
                "node_id": result.node_id,
                "request_id": result.request_id,
                "result": result.value,
                "duration_ms": result.duration_ms,
                "cold_start": result.cold_start,
                "round_trip_ms": round(result.round_trip_ms, 3),
            }
        )
    else:
        print(json.dumps(result.value, indent=2))
    return EXIT_OK


def _invoke_error(args: argparse.Namespace, exc: EdgeExecutionError, code: int) -> int:
    kind = "no_reply" if isinstance(exc, ReplyTimeout) else exc.type
    if args.json:
        emit_json({"ok": False, "error": {"type": kind, "message": str(exc)}})
    print(f"edgectl: {kind}: {exc}", file=sys.stderr)
    return code


# -- state / desired (the cloud-side sync mirror) ---------------------------------------------


def _with_mirror(args: argparse.Namespace) -> tuple[EdgeCluster, Any]:
    from agent.cloud.mirror import SyncMirror

    mirror = SyncMirror(args.prefix, nodes=[args.node])
    holder: dict[str, FleetController] = {}

    def on_message(topic: str, payload: bytes) -> None:
        for out_topic, out_payload, retain in mirror.on_message(topic, payload):
            holder["controller"].publish_nowait(out_topic, out_payload, retain=retain)

    node_topics = protocol.Topics(args.prefix, args.node)
    topics = [node_topics.sync_delta, node_topics.sync_snapshot, node_topics.sync_desired]
    cluster = connect(args, extra_subscriptions=topics, on_message=on_message)
    holder["controller"] = cluster.controller
    return cluster, mirror


def cmd_state(args: argparse.Namespace) -> int:
    if not protocol.is_valid_id(args.node):
        raise UsageError(f"NODE: not a node id: {args.node!r}")
    cluster, mirror = _with_mirror(args)
    with cluster:
        for topic, payload, retain in mirror.resync(args.node):
            cluster.controller.publish(topic, payload, retain=retain)
        state = mirror.wait_for(args.node, lambda s: True, args.timeout)
        desired_version, desired = mirror.desired(args.node)
    if state is None:
        print(
            f"edgectl: no snapshot from {args.node} within {args.timeout:g}s "
            "(is it online, and running an agent with state sync?)",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    doc = {
        "node_id": args.node,
        "version": state.version,
        "checksum": state.checksum,
        "data": state.data,
        "desired_version": desired_version,
        "desired": desired,
    }
    if args.json:
        emit_json(doc)
    else:
        print(f"{args.node}: version {state.version} (desired version {desired_version})")
        print(json.dumps(state.data, indent=2, sort_keys=True))
    return EXIT_OK


def cmd_desired(args: argparse.Namespace) -> int:
    if not protocol.is_valid_id(args.node):
        raise UsageError(f"NODE: not a node id: {args.node!r}")
    data = _json_arg("--set", args.set)
    if not isinstance(data, dict):
        raise UsageError(f"--set: expected a JSON object, got {type(data).__name__}")
    cluster, mirror = _with_mirror(args)
    with cluster:
        topic, payload, retain = mirror.set_desired(args.node, data)
        cluster.controller.publish(topic, payload, retain=retain)
        version, _ = mirror.desired(args.node)
    if args.json:
        emit_json({"node_id": args.node, "version": version, "data": data})
    else:
        print(f"{args.node}: desired state version {version} published")
    return EXIT_OK


# -- keys and the broker ACL --------------------------------------------------------------------


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


# -- the parser -------------------------------------------------------------------------------


def _env(name: str, default: str) -> str:
    return os.environ.get(f"EDGECTL_{name}", default)


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
        "--prefix", default=d(_env("PREFIX", "edge")), help="topic prefix (env EDGECTL_PREFIX)"
    )
    g.add_argument(
        "--tls",
        action="store_true",
        default=d(_env("TLS", "") in ("1", "true", "yes")),
        help="connect with TLS (env EDGECTL_TLS=1)",
    )
    g.add_argument("--ca-file", default=d(_env("CA_FILE", "")), help="CA bundle (PEM)")
    g.add_argument("--cert-file", default=d(_env("CERT_FILE", "")), help="client certificate")
    g.add_argument("--key-file", default=d(_env("KEY_FILE", "")), help="client key")
    g.add_argument("--username", default=d(_env("USERNAME", "")), help="broker user name")
    g.add_argument(
        "--password-file", default=d(_env("PASSWORD_FILE", "")), help="file holding the password"
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
        default=d(float(_env("HEARTBEAT_INTERVAL", "30"))),
        metavar="S",
        help="the agents' heartbeat interval: 3 missed is OFFLINE (default 30)",
    )
    g.add_argument(
        "--retained-wildcards",
        choices=protocol.RETAINED_WILDCARDS,
        default=d(_env("RETAINED_WILDCARDS", "auto")),
        help="does the broker replay retained messages to wildcard subscriptions? no: "
        "RabbitMQ before 3.13 (spec indexes and a roll call); auto: probe (default; env "
        "EDGECTL_RETAINED_WILDCARDS)",
    )
    g.add_argument(
        "--rollcall-window",
        type=float,
        default=d(float(_env("ROLLCALL_WINDOW", "2"))),
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
        default=_env("SIGN_KEY", ""),
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


if __name__ == "__main__":
    sys.exit(main())
