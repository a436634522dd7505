"""``edgectl``'s fleet commands, one function per subcommand (``cmd_<name>(args) -> exit
code``): nodes, deploy, undeploy, invoke, and state / desired through the cloud-side sync
mirror. Each opens one controller (``connect``), acts, closes it, then prints through
``render``.

Must never: parse flags (``parser`` does), or exit the process (``main`` turns the code and
the exceptions into the exit status).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from dataclasses import replace
from typing import Any

from agent.cloud.controller import FleetController
from agent.cloud.ctl.common import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, UsageError
from agent.cloud.ctl.connect import connect
from agent.cloud.ctl.render import (
    consoles,
    emit_json,
    print_nodes,
    print_staged,
    progress_printer,
    report_problems,
    summary,
)
from agent.cloud.rollout import RolloutReport, StagedRollout, canary_count
from agent.cloud.specs import function_spec
from agent.contract import protocol
from agent.errors import DeploymentRejected, EdgeExecutionError, ReplyTimeout

# -- nodes ------------------------------------------------------------------------------------


def node_rows(controller: FleetController, status: str | None) -> list[dict[str, Any]]:
    from agent.models import EdgeNodeStatus

    wanted = EdgeNodeStatus(status) if status else None
    rows = []
    for node in controller.nodes(wanted):
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


def cmd_nodes(args: argparse.Namespace) -> int:
    with connect(args) as controller:
        if args.wait > 0:  # collect a heartbeat from every node (CPU, memory, outbox)
            threading.Event().wait(args.wait)
        rows = node_rows(controller, args.status)
    if args.json:
        emit_json(rows)
        return EXIT_OK
    print_nodes(args, rows)
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
    with connect(args) as controller:
        if args.canary:
            return _deploy_staged(args, controller, spec)
        if args.fleet and not args.no_wait and not controller.targets(spec):
            known = len(controller.nodes())
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
            _, err = consoles(args)
            err.print(f"deploying {spec.id} {spec.version} to {where}: {len(targets)} nodes")
            progress, on_progress = progress_printer(args)
            with progress:
                report = controller.wait_rollout(spec, targets, args.wait, on_progress)
    if args.json:
        emit_json(report.to_dict())
    else:
        report_problems(args, report, "nodes not active")
        print(summary(report))
    return _exit_for(report)


def _deploy_staged(
    args: argparse.Namespace, controller: FleetController, spec: protocol.FunctionSpec
) -> int:
    canary: str | int = int(args.canary) if args.canary.isdigit() else args.canary
    try:
        canary_count(canary, 1)  # only to check the flag before anything is published
    except ValueError as exc:
        raise UsageError(f"--canary: {exc}") from exc
    kwargs: dict[str, Any] = {
        "canary": canary,
        "max_failures": args.max_failures,
        "canary_timeout_s": args.canary_timeout,
        "timeout_s": args.wait,
    }
    if args.json:
        result = controller.staged_rollout(spec, **kwargs)
    else:
        progress, on_progress = progress_printer(args)
        with progress:
            result = controller.staged_rollout(spec, on_progress=on_progress, **kwargs)
    return _staged_outcome(args, result)


def _staged_outcome(args: argparse.Namespace, result: StagedRollout) -> int:
    print_staged(args, result)
    if result.rolled_back:
        return EXIT_FAILED
    assert result.fleet is not None
    return _exit_for(result.fleet)


def cmd_undeploy(args: argparse.Namespace) -> int:
    with connect(args) as controller:
        had = controller.clear_spec(args.function_id, None if args.fleet else args.node)
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
    with connect(args) as controller:
        if controller.node(args.node) is None:
            print(f"edgectl: warning: {args.node} is not a known node", file=sys.stderr)
        try:
            result = controller.invoke(args.node, args.function_id, payload, timeout=args.timeout)
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


def _with_mirror(args: argparse.Namespace) -> tuple[FleetController, Any]:
    from agent.cloud.mirror import SyncMirror

    mirror = SyncMirror(args.prefix, nodes=[args.node])
    holder: dict[str, FleetController] = {}

    def on_message(topic: str, payload: bytes) -> None:
        for out_topic, out_payload, retain in mirror.on_message(topic, payload):
            holder["controller"].publish_nowait(out_topic, out_payload, retain=retain)

    node_topics = protocol.Topics(args.prefix, args.node)
    topics = [node_topics.sync_delta, node_topics.sync_snapshot, node_topics.sync_desired]
    controller = connect(args, extra_subscriptions=topics, on_message=on_message)
    holder["controller"] = controller
    return controller, mirror


def cmd_state(args: argparse.Namespace) -> int:
    if not protocol.is_valid_id(args.node):
        raise UsageError(f"NODE: not a node id: {args.node!r}")
    controller, mirror = _with_mirror(args)
    with controller:
        for topic, payload, retain in mirror.resync(args.node):
            controller.publish(topic, payload, retain=retain)
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
    controller, mirror = _with_mirror(args)
    with controller:
        topic, payload, retain = mirror.set_desired(args.node, data)
        controller.publish(topic, payload, retain=retain)
        version, _ = mirror.desired(args.node)
    if args.json:
        emit_json({"node_id": args.node, "version": version, "data": data})
    else:
        print(f"{args.node}: desired state version {version} published")
    return EXIT_OK
