"""``edgectl``'s connection: broker flags to :class:`~agent.mqtt.MqttSettings`, and the one
:class:`~agent.cloud.FleetController` a command works through (one-shot: QoS 0 views, a
short reconnect backoff).

Must never: print (commands and ``render`` do), or keep a connection past its command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from agent.cloud.controller import FleetController
from agent.cloud.ctl.common import UsageError, env
from agent.config import split_broker
from agent.mqtt import MqttSettings
from agent.trust import Signer


def parse_broker(value: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port); port defaults to 1883."""
    try:
        return split_broker(value)
    except ValueError as exc:
        raise UsageError(f"--broker: {exc}, got {value!r}") from None


def parse_brokers(values: Sequence[str] | str | None) -> tuple[tuple[str, int], ...]:
    """Every ``--broker`` (repeated, or comma lists), else ``EDGECTL_BROKER``, deduplicated."""
    if values is None:
        values = [env("BROKER", "127.0.0.1:1883")]
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
) -> FleetController:
    """A started controller for one command (a context manager: ``with`` closes it)."""
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
    return controller
