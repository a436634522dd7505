"""SIGHUP: which part of a changed config file the running daemon takes, and which waits.

Owns: reading the file and its trust keys again, and the rule of what a running agent keeps
until a restart (its identity, the connection, its files, the uid workers are spawned with).
The loop applies the result (``Agent.reload``).

Must never: apply anything itself, or touch the store, the pool or MQTT.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from agent.config import Config, load_config
from agent.trust import TrustPolicy


@dataclass(frozen=True)
class Reload:
    #: The file as it is (log level, outbox limits, worker caps take effect now).
    new: Config
    #: What runs from now on: ``new`` with the keys that need a restart kept as they were.
    running: Config
    trust: TrustPolicy
    #: ``section.key`` of every change that takes effect only after a restart.
    restart_needed: list[str]


def read_reload(path: str, old: Config) -> Reload:
    """Read ``path`` again; raises AgentError (ConfigError...) when it cannot be used."""
    new = load_config(path)
    trust = TrustPolicy.from_files(
        new.trust.keys,
        require_signed=new.trust.require_signed,
        node_id=old.node.id,
    )
    # What runs keeps these until a restart: the identity, the connection, the files,
    # and the uid workers are spawned with.
    running = replace(
        new,
        node=old.node,
        mqtt=old.mqtt,
        agent=replace(new.agent, state_dir=old.agent.state_dir, durability=old.agent.durability),
        runtime=replace(new.runtime, worker_user=old.runtime.worker_user),
    )
    restart_needed = [key for key, (a, b) in _changed_keys(new, running).items() if a != b]
    return Reload(new, running, trust, restart_needed)


def _changed_keys(new: Config, running: Config) -> dict[str, tuple[object, object]]:
    """``section.key`` -> (in the file, running) for every key; callers keep the differing."""
    out: dict[str, tuple[object, object]] = {}
    for section in ("node", "mqtt", "agent", "runtime", "outbox"):
        a, b = getattr(new, section), getattr(running, section)
        for name in a.__dataclass_fields__:
            out[f"{section}.{name}"] = (getattr(a, name), getattr(b, name))
    return out
