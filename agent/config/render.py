"""Writing the config: the annotated default file (``edge-agent config init``, the reference
``config/agent.toml``) and the effective config as plain TOML data.

Owns the file's layout: a header, each section's comment and header, every key with its raw
default and its comment above it, all taken from :mod:`.schema`'s field table.

Must never: overwrite anything (:func:`write_default_config` refuses an existing file or
symlink), or write effective values into the default file (they would pin the example node).
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import tomli_w

from agent.config.convert import Invalid, identifier, show
from agent.config.schema import SECTIONS, Config
from agent.errors import ConfigError

#: The node id written into a freshly rendered default file.
EXAMPLE_NODE_ID = "gw-01"


def _toml_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The effective config as plain TOML data (``tomli_w.dumps`` writes it; no None)."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        section = getattr(cfg, name)
        out[name] = {f.name: _toml_value(getattr(section, f.name)) for f in fields(section)}
    return out


def _comment(doc: str) -> list[str]:
    """``doc`` as comment lines; a line starting with spaces keeps them on its wrapped lines."""
    lines = []
    for para in doc.split("\n"):
        indent = " " * (len(para) - len(para.lstrip(" ")))
        lines += textwrap.wrap(
            para.lstrip(" "), 88, initial_indent=indent, subsequent_indent=indent + "  "
        )
    return ["# " + line for line in lines]


_HEADER = (
    "edge-agent configuration, normally /etc/edge-agent/agent.toml (root:edge-agent, 0640).\n"
    "Every key is listed with its default value; unknown keys are errors. Only node.id is\n"
    "required. Durations are in seconds and may be written as integers or decimals."
)


def render_default_config(node_id: str = EXAMPLE_NODE_ID) -> str:
    """The annotated default file: every key with its default, a comment above each."""
    try:
        identifier(node_id)
    except Invalid as exc:
        raise ConfigError(f"node.id: {exc.problem}, got {show(node_id)}") from None
    lines = _comment(_HEADER)
    for section in fields(Config):
        lines += ["", *_comment(section.metadata["doc"]), f"[{section.name}]"]
        for n, spec in enumerate(fields(SECTIONS[section.name])):
            # Raw defaults, not effective values: a copied file must not pin client_id or
            # name to the example node's id.
            default = node_id if spec.default is MISSING else spec.default
            setting = tomli_w.dumps({spec.name: _toml_value(default)}).rstrip("\n")
            lines += [""] * (n > 0) + _comment(spec.metadata["doc"]) + [setting]
    return "\n".join(lines) + "\n"


def write_default_config(path: str | Path, *, node_id: str = EXAMPLE_NODE_ID) -> None:
    """Write the annotated default file to ``path``; FileExistsError if anything is there."""
    text = render_default_config(node_id)
    # O_EXCL refuses an existing file and a symlink alike; 0640 as DESIGN.md asks.
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
