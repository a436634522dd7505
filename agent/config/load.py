"""Reading the config: TOML text to a validated :class:`~agent.config.schema.Config`.

Owns the unknown-key and unknown-section checks (with "did you mean" hints), the rules that tie
keys together, and the one read of the file. Every problem raises
:class:`~agent.errors.ConfigError`, one line per problem, each naming the source, the dotted
key and the bad value (``agent.toml: mqtt.keepalive: expected an integer from 5 to 3600, got
"ten"``). Reloading (SIGHUP) is the daemon's: it calls :func:`load_config` again.

Must never: touch anything but the one file it is given: it does not read the password file,
create directories, log, or hand back a partly validated config.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from agent.config.convert import Invalid, show
from agent.config.schema import SECTIONS, Config
from agent.contract import ids
from agent.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/edge-agent/agent.toml"


def _hint(name: str, candidates: Mapping[str, str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {candidates[close[0]]}?)" if close else ""


def _convert_section(
    name: str, cls: type[Any], table: Mapping[str, Any], source: str, problems: list[str]
) -> dict[str, Any]:
    """Convert one section's keys, appending a line to ``problems`` for each bad one."""
    known = {f.name: f for f in fields(cls)}
    for key in table:
        if key not in known:
            hint = _hint(str(key), {k: f"{name}.{k}" for k in known})
            problems.append(f"{source}: {name}.{key}: unknown key{hint}")
    values: dict[str, Any] = {}
    for key, spec in known.items():
        if key not in table:
            if spec.default is MISSING:
                problems.append(f"{source}: {name}.{key}: required, but missing from [{name}]")
            continue
        try:
            values[key] = spec.metadata["convert"](table[key])
        except Invalid as exc:
            where = f"{name}.{key}{exc.at}"
            problems.append(f"{source}: {where}: {exc.problem}, got {show(exc.value)}")
    return values


def _check_relations(cfg: Config) -> list[str]:
    """Rules that tie keys together, as ``key: problem, got value`` lines."""
    mqtt, runtime = cfg.mqtt, cfg.runtime
    lines: list[str] = []

    def bad(key: str, problem: str, value: Any) -> None:
        lines.append(f"{key}: {problem}, got {show(value)}")

    if not mqtt.tls:
        for key in ("ca_file", "cert_file", "key_file", "tls_insecure"):
            if getattr(mqtt, key):
                bad("mqtt.tls", f"must be true when mqtt.{key} is set", mqtt.tls)
    if bool(mqtt.cert_file) != bool(mqtt.key_file):
        missing, present = (
            ("key_file", "cert_file") if mqtt.cert_file else ("cert_file", "key_file")
        )
        bad(f"mqtt.{missing}", f"must be set together with mqtt.{present}", "")
    if mqtt.reconnect_max_s < mqtt.reconnect_min_s:
        bound = f"mqtt.reconnect_min_s ({mqtt.reconnect_min_s:g})"
        bad("mqtt.reconnect_max_s", f"expected a number >= {bound}", mqtt.reconnect_max_s)
    for index, start in enumerate(mqtt.reply_prefixes):
        for level in ("fleet", "nodes", "controllers"):
            owned = f"{mqtt.topic_prefix}/{level}"
            if start == owned or start.startswith(f"{owned}/"):
                need = f"must not fall under {owned}/ (the wire contract's topics)"
                bad(f"mqtt.reply_prefixes[{index}]", need, start)
    if mqtt.topic_charset == "portable":  # every topic the agent names must be portable
        need = 'must not contain "." or spaces with mqtt.topic_charset = "portable"'
        named = [("mqtt.topic_prefix", mqtt.topic_prefix)] + [
            (f"mqtt.reply_prefixes[{i}]", start) for i, start in enumerate(mqtt.reply_prefixes)
        ]
        for key, value in named:
            if ids.topic_charset_problem(value, "portable") is not None:
                bad(key, need, value)
    if mqtt.protocol == "3.1.1" and mqtt.password_file and not mqtt.username:
        # MQTT 3.1.1 forbids the password flag without the user name flag; 5 allows it.
        need = "MQTT 3.1.1 needs a user name when mqtt.password_file is set"
        bad("mqtt.username", need, mqtt.username)
    for kind in ("memory_mb", "timeout_s"):
        default, maximum = getattr(runtime, f"default_{kind}"), getattr(runtime, f"max_{kind}")
        if default > maximum:
            bad(
                f"runtime.default_{kind}",
                f"expected at most runtime.max_{kind} ({maximum})",
                default,
            )
    if runtime.prestart > runtime.max_workers:
        cap = f"expected at most runtime.max_workers ({runtime.max_workers})"
        bad("runtime.prestart", cap, runtime.prestart)
    if cfg.outbox.max_bytes < cfg.agent.max_payload_bytes:
        floor = f"expected at least agent.max_payload_bytes ({cfg.agent.max_payload_bytes})"
        bad("outbox.max_bytes", floor, cfg.outbox.max_bytes)
    return lines


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate parsed TOML into a :class:`Config`; every problem in one ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table of sections, got {show(data)}")
    # A stray top-level key is usually a key written above its [section] header.
    top_level = {name: f"[{name}]" for name in SECTIONS}
    for name, cls in SECTIONS.items():
        for spec in fields(cls):
            top_level.setdefault(spec.name, f"{name}.{spec.name}")
    problems: list[str] = []
    for name, value in data.items():
        if name not in SECTIONS:
            kind = "unknown section" if isinstance(value, Mapping) else "unknown key"
            problems.append(f"{source}: {name}: {kind}{_hint(str(name), top_level)}")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, Mapping):
            problems.append(f"{source}: {name}: expected a table [{name}], got {show(table)}")
            continue
        values = _convert_section(name, cls, table, source, problems)
        if not problems:
            sections[name] = cls(**values)
    if not problems:
        cfg = Config(**sections)
        problems = [f"{source}: {line}" for line in _check_relations(cfg)]
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate the TOML file at ``path``; any failure is a ConfigError."""
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8-sig"))  # -sig: tolerate an editor's BOM
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (bad byte at offset {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    return parse_config(data, source)
