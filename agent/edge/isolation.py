"""Function isolation: a uid and gid of its own for each function, and file modes that let it
read its own code and nothing else of the agent's.

Owns: whether the agent can switch users at all; allocating a function's identity from
``runtime.function_uids`` (kept in the store's meta table, so a function keeps its uid, and
its installed files their group, across restarts); granting a code directory to a function
(group = its gid, directories 0750 and files 0640, the directories above traversable but
not listable); joining the function's group when the agent is not root, which is what lets
it set that group on files with only CAP_SETGID (no CAP_CHOWN).

What a function's worker then cannot do: read ``/etc/edge-agent`` (root:edge-agent 0750),
``state.db`` (0600), another function's code (another group, 0750), any process's
``/proc/<pid>/environ`` but its own function's, or signal the agent (another uid). The worker
takes the identity itself before loading user code (:func:`agent.exec.worker.become`).

Must never: spawn or signal processes (the pool does), or weaken a mode it finds stricter
than it needs, except the state directory's and the functions root's search bit.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
import sys
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path

from agent.errors import DeploymentRejected
from agent.store import Store

log = logging.getLogger(__name__)

_CAP_SETGID = 6
_CAP_SETUID = 7
_META_PREFIX = "uid."


def effective_capabilities() -> int:
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"CapEff:"):
                    return int(line.split(b":", 1)[1].strip(), 16)
    except OSError:
        pass
    return 0


def can_switch_users() -> bool:
    """Root, or CAP_SETUID and CAP_SETGID in the effective set (the packaged unit's grant)."""
    if os.geteuid() == 0:
        return True
    caps = effective_capabilities()
    return bool(caps >> _CAP_SETUID & 1 and caps >> _CAP_SETGID & 1)


def parse_range(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    first, _, last = text.partition("-")
    return int(first), int(last)


def _name_taken(uid: int) -> bool:
    """A uid or gid that some account or group already has (an operator's, DynamicUser's)."""
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    try:
        grp.getgrgid(uid)
        return True
    except KeyError:
        return False


@dataclass(frozen=True)
class Isolation:
    """What the agent reports as ``isolation`` in its status, and why."""

    mode: str  # "uid" or "shared-uid"
    reason: str = ""


class FunctionIdentities:
    """Each function's (uid, gid); None when functions share the agent's (or worker_user's)."""

    def __init__(self, store: Store, uid_range: str, functions_dir: Path) -> None:
        self.store = store
        self.range = parse_range(uid_range)
        self.functions_dir = functions_dir
        self.isolation = Isolation("shared-uid", "runtime.function_uids is empty")
        self._lock = threading.Lock()

    def start(self, python: str) -> Isolation:
        """Decide the mode once (at boot, with the store open); make the code tree reachable.

        ``python`` is the workers' interpreter: function users must be able to run it.
        """
        if self.range is None:
            return self.isolation
        if not can_switch_users():
            self.isolation = Isolation(
                "shared-uid",
                "the agent is not root and lacks CAP_SETUID/CAP_SETGID (see packaging/README.md)",
            )
            return self.isolation
        blocked = _unreachable_interpreter(python) or self._prepare_tree()
        if blocked:
            self.isolation = Isolation("shared-uid", blocked)
            return self.isolation
        if os.geteuid() != 0:
            for _, gid in self._allocated().values():
                _join_group(gid)
        self.isolation = Isolation("uid")
        return self.isolation

    def identity(self, function_id: str) -> tuple[int, int] | None:
        """The function's (uid, gid), allocated on first use; None when not isolating.

        Raises DeploymentRejected when the range is used up.
        """
        if self.isolation.mode != "uid":
            return None
        with self._lock:
            allocated = self._allocated()
            if function_id in allocated:
                return allocated[function_id]
            assert self.range is not None
            taken = {uid for uid, _ in allocated.values()}
            for uid in range(self.range[0], self.range[1] + 1):
                if uid not in taken and not _name_taken(uid):
                    break
            else:
                raise DeploymentRejected(
                    f"{function_id}: no free uid left in runtime.function_uids "
                    f"({self.range[0]}-{self.range[1]}, {len(taken)} functions have one)"
                )
            self.store.set_meta(f"{_META_PREFIX}{function_id}", str(uid))
        if os.geteuid() != 0:
            _join_group(uid)
        log.info("function %s runs as uid %d", function_id, uid, extra={"function_id": function_id})
        return uid, uid

    def uids(self) -> list[int]:
        """Every function uid handed out (none when functions share one)."""
        if self.isolation.mode != "uid":
            return []
        return sorted(uid for uid, _ in self._allocated().values())

    def grant(self, function_id: str, code_dir: Path) -> None:
        """Give the function (its group) read access to ``code_dir``, and nobody else."""
        ident = self.identity(function_id)
        if ident is None:
            return
        _, gid = ident
        function_root = self.functions_dir / function_id
        for path in (function_root, *_tree(code_dir)):
            mode = 0o750 if path.is_dir() and not path.is_symlink() else 0o640
            os.chown(path, -1, gid, follow_symlinks=False)
            if not path.is_symlink():
                os.chmod(path, mode)

    def _allocated(self) -> dict[str, tuple[int, int]]:
        return {
            key[len(_META_PREFIX) :]: (int(value), int(value))
            for key, value in self.store.meta_items(_META_PREFIX).items()
        }

    def _prepare_tree(self) -> str:
        """Let other uids search (not list) the state directory and the functions root.

        Returns why isolation cannot work here (a directory above them that others cannot
        search), or "".
        """
        above = _searchable_by_others(self.functions_dir.parent.resolve().parent)
        if above is not None:
            return (
                f"{above} is not searchable by other users (mode "
                f"{stat.S_IMODE(above.stat().st_mode):04o}), so function uids could not "
                f"reach their code under {self.functions_dir}"
            )
        self.functions_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        for own in (self.functions_dir, self.functions_dir.parent):
            mode = stat.S_IMODE(own.stat().st_mode)
            if not mode & stat.S_IXOTH:
                os.chmod(own, mode | stat.S_IXOTH)
        return ""


def _searchable_by_others(path: Path) -> Path | None:
    """The first of ``path`` and its ancestors that other users cannot search, or None."""
    for part in (path, *path.parents):
        if not part.stat().st_mode & stat.S_IXOTH:
            return part
    return None


def _unreachable_interpreter(python: str) -> str:
    """Why function users could not run the workers' interpreter, or ""."""
    resolved = Path(python).resolve()
    places = [resolved]
    if resolved == Path(sys.executable).resolve():
        places.append(Path(sysconfig.get_paths()["stdlib"]).resolve())
    for place in places:
        blocked = _searchable_by_others(place)
        if blocked is not None:
            return (
                f"{blocked} is not searchable by other users, so function uids could not run "
                f"{resolved} or read its standard library; set runtime.worker_python to one "
                f"they can (e.g. /usr/bin/python3)"
            )
    return ""


def _tree(root: Path) -> list[Path]:
    out = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        out.extend(base / name for name in dirnames)
        out.extend(base / name for name in filenames)
    return out


def _join_group(gid: int) -> None:
    """Make the agent a member of ``gid`` so it may set that group on its files (CAP_SETGID).

    glibc applies setgroups to every thread of the process.
    """
    groups = os.getgroups()
    if gid not in groups:
        os.setgroups([*groups, gid])
