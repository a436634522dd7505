"""The package layout's arrows (docs/architecture.md): which package may import which.

Every ``import agent...`` and ``from agent... import`` in ``agent/`` is read from the source
(``TYPE_CHECKING`` and function-local imports too: an arrow is an arrow) and checked against
one table. A new import that points the wrong way (the cloud reaching into the daemon, the
contract into the store) fails here with the file, the line and the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parent.parent / "agent"

#: What each unit of agent/ may import (besides itself). Units are the subpackages and the
#: shared top-level modules; "agent" is the package's own __init__/__main__.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "models": set(),
    "contract": {"errors", "models"},
    "config": {"errors", "contract"},
    "mqtt": {"errors", "config", "contract"},
    "trust": {"errors", "config", "contract", "models"},
    "store": {"errors", "models", "contract"},
    "exec": {"errors", "models", "contract"},
    "cloud": {"errors", "models", "contract", "config", "mqtt", "trust", "exec"},
    "local": {"errors", "models", "contract", "config", "mqtt", "trust", "exec", "store", "cloud"},
    "edge": {"errors", "models", "contract", "config", "mqtt", "trust", "exec", "store"},
    "agent": {"errors", "models", "local", "exec", "edge"},
}
#: Narrower rules inside the broad ones: (importer unit, imported module prefix) pairs.
ONLY_FROM: dict[str, set[str]] = {
    # The cloud uses exec only to zip a directory into a bundle; never the pool or the worker.
    "agent.exec": {"agent.exec.bundles"},
}


def unit_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in {"__init__", "__main__"}:
        return "agent"
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(AGENT.parent).with_suffix("")
    return ".".join(rel.parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every agent module ``path`` imports, with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("agent.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "agent":  # from agent import protocol -> agent.protocol
                found += [(node.lineno, f"agent.{a.name}") for a in node.names]
            elif node.module.startswith("agent."):
                found.append((node.lineno, node.module))
    return found


SOURCES = sorted(AGENT.rglob("*.py"))


def test_every_unit_is_in_the_table() -> None:
    units = {unit_of(module_name(p)) for p in SOURCES}
    assert units == set(ALLOWED), (
        f"units without a rule or rules without a unit: {units ^ set(ALLOWED)}"
    )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(AGENT)))
def test_imports_point_the_allowed_way(path: Path) -> None:
    me = unit_of(module_name(path))
    wrong = []
    for line, target in imports_of(path):
        if target in {"agent.__version__", "agent.TYPE_CHECKING"}:
            continue
        them = unit_of(target)
        if them == me:
            continue
        if them not in ALLOWED[me]:
            wrong.append(f"{path.relative_to(AGENT.parent)}:{line}: {me} -> {target}")
        elif me == "cloud" and them == "exec":
            allowed = ONLY_FROM["agent.exec"]
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                wrong.append(f"{path.relative_to(AGENT.parent)}:{line}: cloud -> {target}")
    assert not wrong, "imports against docs/architecture.md's arrows:\n" + "\n".join(wrong)


def test_nothing_imports_the_composition_roots() -> None:
    """cli (edge-agent) and ctl (edgectl) build everything; nothing below may import them."""
    roots = ("agent.edge.cli", "agent.cloud.ctl")
    wrong = []
    for path in SOURCES:
        me = module_name(path)
        if me.startswith(roots) or me == "agent.__main__":
            continue
        for line, target in imports_of(path):
            if target.startswith(roots):
                wrong.append(f"{path.relative_to(AGENT.parent)}:{line}: imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_table_catches_a_wrong_arrow(tmp_path: Path) -> None:
    """The check itself: a contract module importing the store is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from agent.store import Store\nfrom agent import errors\n")
    targets = [t for _, t in imports_of(bad)]
    assert targets == ["agent.store", "agent.errors"]
    assert unit_of("agent.store") not in ALLOWED["contract"]
