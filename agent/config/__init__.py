"""The agent's TOML configuration: schema, validation and the annotated default file.

Owns the frozen :class:`Config` tree and the one table that knows every key: each dataclass
field carries its default, its converter (one small validator per field type, as supervisor's
``datatypes.py`` has) and the comment written above it in the default file. The reference
``config/agent.toml`` is :func:`render_default_config` output, so code and file cannot drift.

The package, by concern:

- :mod:`.convert`: one converter per field type, and :func:`split_broker`;
- :mod:`.schema`: the dataclass tree (:class:`Config` and its sections) and its field table;
- :mod:`.load`: TOML text to a validated ``Config`` (unknown keys, rules across keys);
- :mod:`.render`: the annotated default file (``edge-agent config init``) and
  :func:`config_to_dict`.

This module only re-exports their public names, so ``from agent.config import X`` keeps
working for every importer (the daemon, the CLI, ``edgectl``, the seed's cluster, tests).
It must never hold logic of its own; like the whole package, it must never touch anything
but the one file it is given: no password file, no directories, no logging.
"""

from __future__ import annotations

from agent.config.convert import (
    Convert,
    broker_list,
    choice,
    flag,
    identifier,
    integer,
    is_valid_id,
    key_files,
    number,
    path,
    protocol,
    reply_prefixes,
    split_broker,
    string,
    string_list,
    topic_prefix,
    uid_range,
)
from agent.config.load import DEFAULT_CONFIG_PATH, load_config, parse_config
from agent.config.render import (
    EXAMPLE_NODE_ID,
    config_to_dict,
    render_default_config,
    write_default_config,
)
from agent.config.schema import (
    SECTIONS,
    AgentSettings,
    Config,
    MqttConfig,
    NodeConfig,
    OutboxConfig,
    RuntimeConfig,
    TrustConfig,
    effective_client_id,
)

# The id rule is agent.contract.ids's (one table for every name rule); re-exported where it
# always was.
from agent.contract.ids import ID_PATTERN, ID_RE
from agent.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "EXAMPLE_NODE_ID",
    "ID_PATTERN",
    "ID_RE",
    "SECTIONS",
    "AgentSettings",
    "Config",
    "ConfigError",
    "Convert",
    "MqttConfig",
    "NodeConfig",
    "OutboxConfig",
    "RuntimeConfig",
    "TrustConfig",
    "broker_list",
    "choice",
    "config_to_dict",
    "effective_client_id",
    "flag",
    "identifier",
    "integer",
    "is_valid_id",
    "key_files",
    "load_config",
    "number",
    "parse_config",
    "path",
    "protocol",
    "render_default_config",
    "reply_prefixes",
    "split_broker",
    "string",
    "string_list",
    "topic_prefix",
    "uid_range",
    "write_default_config",
]
