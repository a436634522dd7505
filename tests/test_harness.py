"""The harness has one home: only ``testing/`` starts brokers, and nothing imports scripts/.

Static checks over the sources (no process is started):

- no file in agent/, tests/ or scripts/ launches mosquitto or nats-server itself (a
  subprocess/exec call whose command names either binary); ``testing/broker.py`` does, and
  the detector is checked against it and against small samples so it cannot go blind;
- no test (nor the harness) imports a module of scripts/ or puts scripts/ on ``sys.path``;
- no benchmark section imports another (what they share is ``testing/bench.py``);
- nothing in agent/ imports the harness.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from testing.agent_process import REPO

BINARIES = ("mosquitto", "nats-server")

#: Files outside testing/ that may name a broker binary next to a process call, and why.
ALLOWED: dict[str, str] = {
    "tests/nspawn.py": "installs the Debian packages (mosquitto among them) inside a booted "
    "systemd-nspawn container; apt's postinst and systemd start the broker there, not this file",
    "tests/deb_guest.py": "runs inside that container and talks to the broker systemd started, "
    "with the mosquitto_pub/_sub/_rr clients; it never launches a broker",
}

#: Calls that start a program: subprocess.*, os.exec*/spawn*/system/popen, asyncio's.
_SPAWN = re.compile(
    r"^(subprocess\.(Popen|run|call|check_call|check_output)|Popen|"
    r"os\.(exec\w*|spawn\w*|system|popen|posix_spawnp?)|"
    r"asyncio\.create_subprocess_(exec|shell))$"
)
_BINARY_NAME = re.compile(r"mosquitto$|nats[-_]server$", re.IGNORECASE)
_SHELL_COMMAND = re.compile(r"^\s*(?:exec\s+|sudo\s+|nohup\s+)*(?:\S*/)?(mosquitto|nats-server)\b")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _names_binary(node: ast.AST, aliases: set[str]) -> bool:
    """Whether an expression names a broker binary: "mosquitto", "/usr/sbin/nats-server",
    "mosquitto -c x.conf", shutil.which("mosquitto"), MOSQUITTO, NATS_SERVER, an alias."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            head = sub.value.strip().split(" ")[0]
            if head.rsplit("/", 1)[-1] in BINARIES:
                return True
        elif isinstance(sub, ast.Name | ast.Attribute):
            name = sub.id if isinstance(sub, ast.Name) else sub.attr
            if _BINARY_NAME.search(name) or name in aliases:
                return True
    return False


def launches_broker(source: str) -> list[int]:
    """Line numbers of the calls in ``source`` (Python) that start mosquitto or nats-server."""
    tree = ast.parse(source)
    aliases: set[str] = set()  # names assigned a binary's path, e.g. m = shutil.which(...)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _names_binary(node.value, set()):
            aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and _SPAWN.match(_dotted(node.func))
        and any(_names_binary(arg, aliases) for arg in [*node.args, *node.keywords])
    ]


def _shell_launches(text: str) -> list[int]:
    return [
        n
        for n, line in enumerate(text.splitlines(), 1)
        if not line.lstrip().startswith("#") and _SHELL_COMMAND.match(line)
    ]


def _sources(*dirs: str) -> list[Path]:
    """Python files under ``dirs`` plus the extensionless scripts (shell or Python)."""
    found: list[Path] = []
    for name in dirs:
        root = REPO / name
        found += sorted(root.rglob("*.py"))
        found += sorted(p for p in root.glob("*") if p.is_file() and not p.suffix)
    return found


def _is_python(path: Path) -> bool:
    return path.suffix == ".py" or path.read_text(errors="replace").startswith(
        "#!/usr/bin/env python"
    )


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_only_the_harness_launches_a_broker() -> None:
    offenders = []
    for path in _sources("agent", "tests", "scripts"):
        if _rel(path) in ALLOWED:
            continue
        text = path.read_text(errors="replace")
        lines = launches_broker(text) if _is_python(path) else _shell_launches(text)
        offenders += [f"{_rel(path)}:{n}" for n in lines]
    assert not offenders, (
        "these start mosquitto/nats-server themselves; use testing.broker instead: "
        + ", ".join(offenders)
    )


def test_the_allowances_still_name_real_files() -> None:
    missing = [name for name in ALLOWED if not (REPO / name).exists()]
    assert not missing, f"ALLOWED names files that are gone: {missing}"


def test_the_detector_sees_the_harness_and_samples() -> None:
    """The guard is only as good as its detector: it must flag the harness's own launches."""
    harness = (REPO / "testing" / "broker.py").read_text()
    assert len(launches_broker(harness)) >= 3, "mosquitto, a NATS node, one nats-server"
    flagged = [
        'subprocess.Popen([MOSQUITTO, "-c", str(conf)])',
        'subprocess.Popen(["nats-server", "-c", "n.conf"], stdout=log)',
        'm = shutil.which("mosquitto")\nsubprocess.Popen([m, "-c", c])',
        'os.system("mosquitto -c x.conf &")',
        'subprocess.run(["/usr/sbin/nats-server", "--version"], check=False)',
    ]
    for sample in flagged:
        assert launches_broker(sample), f"not flagged: {sample!r}"
    clean = [
        'subprocess.run(["mosquitto_pub", "-t", "x", "-m", "y"])',
        'subprocess.Popen([sys.executable, "scripts/fleet_sim.py"])',
        'PACKAGES = ["mosquitto"]\nprint(PACKAGES)',
    ]
    for sample in clean:
        assert not launches_broker(sample), f"flagged wrongly: {sample!r}"
    assert _shell_launches("exec /usr/sbin/mosquitto -c x.conf")
    assert not _shell_launches("command -v mosquitto >/dev/null || need_apt+=(mosquitto)")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _puts_scripts_on_path(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and _dotted(node.func) in ("sys.path.insert", "sys.path.append")
            and "scripts" in ast.unparse(node)
        ):
            return True
    return False


SCRIPT_MODULES = {p.stem for p in (REPO / "scripts").glob("*.py")}


@pytest.mark.parametrize("where", ["tests", "testing"])
def test_nothing_imports_scripts(where: str) -> None:
    offenders = [
        f"{_rel(path)} imports {sorted(_imported_modules(path) & SCRIPT_MODULES)}"
        for path in sorted((REPO / where).rglob("*.py"))
        if _imported_modules(path) & SCRIPT_MODULES
    ]
    offenders += [
        f"{_rel(path)} puts scripts/ on sys.path"
        for path in sorted((REPO / where).rglob("*.py"))
        if _puts_scripts_on_path(path)
    ]
    assert not offenders, "; ".join(offenders) + " (shared code belongs in testing/)"


def test_bench_sections_do_not_import_each_other() -> None:
    offenders = {
        _rel(path): sorted(_imported_modules(path) & (SCRIPT_MODULES - {path.stem}))
        for path in sorted((REPO / "scripts").glob("*.py"))
    }
    offenders = {name: mods for name, mods in offenders.items() if mods}
    assert not offenders, f"{offenders}: shared bench pieces belong in testing/bench.py"


def test_agent_never_imports_the_harness() -> None:
    offenders = [
        _rel(path)
        for path in sorted((REPO / "agent").rglob("*.py"))
        if "testing" in _imported_modules(path)
    ]
    assert not offenders, f"agent/ must not import testing/: {offenders}"
