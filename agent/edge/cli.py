"""``edge-agent``: the command line. The composition root; nothing imports it.

Exit codes: 0 success, 1 failure, 78 (EX_CONFIG) bad configuration, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    config_to_dict,
    load_config,
    write_default_config,
)
from agent.contract import protocol
from agent.edge.loop import Agent
from agent.edge.systemd import Notifier
from agent.edge.uplink import Transport
from agent.errors import AgentError, ConfigError, StoreError
from agent.exec.pool import WorkerLimits, WorkerPool
from agent.mqtt import MqttClient, MqttSettings, Will
from agent.store import Store

EX_CONFIG = 78

log = logging.getLogger("agent.edge.cli")


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"edge-agent: {line}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def mqtt_settings(config: Config) -> MqttSettings:
    """The agent's connection settings (:meth:`MqttSettings.from_config`)."""
    return MqttSettings.from_config(config)


def build_agent(
    config: Config,
    *,
    config_path: str | None = None,
    notifier: Notifier | None = None,
    mqtt_factory: Callable[..., Transport] = MqttClient,
) -> Agent:
    """The composition root's work: build the adapters and hand them to an Agent."""
    r = config.runtime
    pool = WorkerPool(
        max_workers=r.max_workers,
        prestart=r.prestart,
        max_queue=r.max_queue,
        max_invocations=r.worker_max_invocations,
        codec="json",
        python=r.worker_python or sys.executable,
        # a result bigger than a reply may be is refused before the agent buffers it
        max_frame=config.agent.max_payload_bytes + 64 * 1024,
        max_frame_source="agent.max_payload_bytes",
        user=r.worker_user or None,
        limits=WorkerLimits(),
    )
    store = Store(
        Path(config.agent.state_dir) / "state.db",
        durability=config.agent.durability,
        max_messages=config.outbox.max_messages,
        max_bytes=config.outbox.max_bytes,
    )
    agent = Agent(
        config,
        store=store,
        pool=pool,
        notifier=notifier or Notifier.from_env(),
        config_path=config_path,
    )
    topics = agent.topics
    node = config.node
    will = Will(
        topics.status,
        protocol.encode_status(
            node.id,
            "offline",
            agent_version=__version__,
            name=node.name,
            location=node.location,
            capabilities=node.capabilities,
            extra={"reason": "connection lost"},
        ),
    )
    mode = config.mqtt.retained_wildcards
    extra: dict[str, Any] = {}
    if mode != "yes":  # a roll call is only worth answering now: no queued copies of it
        extra["subscription_qos"] = {topics.rollcall: 0}
    agent.mqtt = mqtt_factory(
        mqtt_settings(config),
        agent.post,
        will=will,
        subscriptions=topics.subscriptions(mode),
        **extra,
    )
    return agent


def cmd_run(args: argparse.Namespace) -> int:
    from agent.edge.systemd import setup_logging

    config = _load(args.config)
    setup_logging(config.agent.log_level)
    agent = build_agent(config, config_path=args.config)
    agent.install_signal_handlers()
    try:
        return agent.run()
    except StoreError as exc:
        log.critical("local state unusable: %s", exc)
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    import tomli_w

    from agent.trust import TrustPolicy

    config = _load(args.config)
    TrustPolicy.from_config(config)  # [trust] keys: PEM, ed25519, not writable by the agent
    print(f"# {args.config}: OK; effective configuration:")
    print(tomli_w.dumps(config_to_dict(config)), end="")
    return 0


def cmd_config_init(args: argparse.Namespace) -> int:
    path = args.path or DEFAULT_CONFIG_PATH
    try:
        write_default_config(path, node_id=args.node_id)
    except FileExistsError:
        print(f"edge-agent: {path} exists; not overwriting it", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"edge-agent: cannot write {path}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Local state from the state dir: works while the agent runs (SQLite WAL) or not.

    ``--clear-dead-letters`` forgets the messages the broker refused for good;
    ``--retry-dead-letters`` marks them to be sent again (the running agent, or the next one
    to start, puts them back in the outbox within 2 s). Either way the agent reports itself
    online again once none are left.
    """
    from agent.store import Store

    config = _load(args.config)
    db = Path(config.agent.state_dir) / "state.db"
    if not db.exists():
        print(f"edge-agent: no state at {db} (has the agent run yet?)", file=sys.stderr)
        return 1
    store = Store(db, dedupe_filter=False)  # it never looks a request up
    try:
        store.open()
        if args.clear_dead_letters:
            print(f"cleared {store.dead_letters_clear()} dead letters", file=sys.stderr)
        elif args.retry_dead_letters:
            marked = store.dead_letters_request_retry()
            print(f"marked {marked} dead letters to be sent again", file=sys.stderr)
        deployments = store.list_deployments()
        count, nbytes = store.outbox_depth()
        last_connect = store.get_meta("last_connect_ts")
        dead_count, dead_marked = store.dead_letter_counts()
        dead = store.dead_letters(5)
        repaired = store.get_meta("store_repaired")
    except StoreError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    functions: list[dict[str, Any]] = [
        {
            "id": d.function_id,
            "version": d.version,
            "state": d.state,
            "active_version": d.active_version,
            "error": json.loads(d.error_json) if d.error_json else None,
        }
        for d in deployments
    ]
    status: dict[str, Any] = {
        "node_id": config.node.id,
        "state_dir": config.agent.state_dir,
        "last_connect": last_connect,
        "outbox": {"messages": count, "bytes": nbytes},
        "functions": functions,
        "dead_letters": {
            "count": dead_count,
            "marked_for_retry": dead_marked,
            "newest": [
                {
                    "topic": d.topic,
                    "kind": d.kind,
                    "reason": d.reason,
                    "reason_code": d.reason_code,
                    "attempts": d.attempts,
                    "bytes": d.size,
                    "ts": protocol.now_ts(d.dead_ts),
                }
                for d in dead
            ],
        },
    }
    # The last time the agent found state.db damaged at start and replaced it (issue 12).
    status["store_repaired"] = json.loads(repaired) if repaired else None
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"node:         {status['node_id']}")
    print(f"state dir:    {status['state_dir']}")
    print(f"last connect: {last_connect or 'never'}")
    print(f"outbox:       {count} messages, {nbytes} bytes")
    shown = f", newest {len(dead)}:" if dead else ""
    marked_note = f" ({dead_marked} marked for retry)" if dead_marked else ""
    print(f"dead letters: {dead_count}{marked_note}{shown}")
    for d in status["dead_letters"]["newest"]:
        print(
            f"  {d['ts']}  {d['kind']:<6} {d['topic']}  "
            f"{d['reason']} ({d['reason_code']:#04x}, {d['attempts']} refusals)"
        )
    if dead_count:
        print("  degraded until none are left: --clear-dead-letters or --retry-dead-letters")
    if status["store_repaired"]:
        r = status["store_repaired"]
        lost = "unknown" if r["lost_outbox"] is None else r["lost_outbox"]
        print(f"store repair: {r['ts']}: damaged state.db moved to {r['moved_to']}")
        print(f"  outbox messages lost: {lost}; problems: {'; '.join(r['problems'])}")
    print(f"functions:    {len(deployments)}")
    for fn in functions:
        line = f"  {fn['id']:<24} {fn['version']:<12} {fn['state']:<9}"
        if fn["active_version"] and fn["active_version"] != fn["version"]:
            line += f" (serving {fn['active_version']})"
        if fn["error"]:
            line += f"  {fn['error'].get('message', '')}"
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent", description="The edge-agent gateway daemon and its tools."
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            "-c",
            default=DEFAULT_CONFIG_PATH,
            help=f"config file (default {DEFAULT_CONFIG_PATH})",
        )

    run = sub.add_parser("run", help="run the agent (what systemd starts)")
    with_config(run)
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check-config", help="validate a config; print the effective one")
    with_config(check)
    check.set_defaults(func=cmd_check_config)
    config = sub.add_parser("config", help="config file tools")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    init = config_sub.add_parser("init", help="write an annotated default config")
    init.add_argument("path", nargs="?", help=f"where (default {DEFAULT_CONFIG_PATH})")
    init.add_argument("--node-id", default="gw-01", help="this gateway's id (default gw-01)")
    init.set_defaults(func=cmd_config_init)
    status = sub.add_parser("status", help="local state: functions, outbox, last connect")
    with_config(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    dead_letters = status.add_mutually_exclusive_group()
    dead_letters.add_argument(
        "--clear-dead-letters",
        action="store_true",
        help="forget the messages the broker refused for good (the agent is then online again)",
    )
    dead_letters.add_argument(
        "--retry-dead-letters",
        action="store_true",
        help="have the agent send the refused messages again (e.g. after an ACL fix)",
    )
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EX_CONFIG
    except AgentError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
