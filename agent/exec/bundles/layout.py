"""The layout of ``<functions_dir>`` and every change to it but an install: where a version
goes, the crash-safe removal (rename to ``.trash-*``, then delete), pruning old versions,
clearing a crash's leftovers, and disk usage (measured, and estimated before an install).

Never follow a symlink or create one, never write outside ``<functions_dir>``, and never
delete a directory in place: it is renamed out of sight first.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import secrets
import shutil
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

from agent.exec.bundles.checks import (
    _CORRUPT_ZIP_ERRORS,
    _check_function_id,
    _check_version,
    _normalise_sha256,
)

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"


# A real version directory: <version>-<sha12>.
_VERSION_DIR_RE = re.compile(r"(?P<version>.+)-(?P<sha12>[0-9a-f]{12})")


def version_dir(functions_dir: Path, function_id: str, version: str, sha256: str) -> Path:
    """Where that version is (or would be) installed; lets a caller skip work if it exists."""
    _check_function_id(function_id)
    _check_version(version)
    digest = _normalise_sha256(sha256)
    return functions_dir / function_id / f"{version}-{digest[:12]}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir(path: Path) -> None:
    """One directory, mode 0755 whatever the umask."""
    os.mkdir(path, 0o755)
    os.chmod(path, 0o755)


def _ensure_function_dir(functions_dir: Path, function_id: str) -> Path:
    functions_dir.mkdir(parents=True, exist_ok=True)
    function_dir = functions_dir / function_id
    try:
        _mkdir(function_dir)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(function_dir).st_mode):
            raise NotADirectoryError(
                errno.ENOTDIR, "function path is not a directory", str(function_dir)
            ) from None
    else:
        _fsync_dir(functions_dir)
    return function_dir


def _remove_tree(path: Path) -> None:
    """Delete a file, symlink or directory tree without following symlinks."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _discard(path: Path, trash_name: str) -> None:
    """Rename ``path`` out of sight first, then delete it, so a crash leaves only trash."""
    trash = path.parent / trash_name
    os.rename(path, trash)
    _fsync_dir(path.parent)
    _remove_tree(trash)


def _lstat_is(path: Path, predicate: Callable[[int], bool]) -> bool:
    """``predicate(mode)`` of ``path`` itself (a symlink is never a dir or regular file)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    return predicate(mode)


# -- disk usage -------------------------------------------------------------------------------


#: What one file or directory takes at least (a filesystem block) in the estimates.
_BLOCK = 4096


def _blocks(n: int) -> int:
    return max(_BLOCK, -(-n // _BLOCK) * _BLOCK)


def estimated_disk_bytes(code_format: str, raw: bytes) -> int:
    """What a verified bundle will take on disk once unpacked, from its central directory
    (declared sizes, each file and directory rounded up to a 4 KiB block): an upper bound
    the quota can refuse before a byte is written (the unpacker never writes more than
    declared). A zip that cannot be read counts as its own size; unpacking rejects it."""
    if code_format != "zip":
        return _BLOCK + _blocks(len(raw))
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            infos = archive.infolist()
    except _CORRUPT_ZIP_ERRORS:
        return _BLOCK + _blocks(len(raw))
    dirs: set[str] = set()
    for info in infos:
        parts = info.orig_filename.removesuffix("/").split("/")
        dirs.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
        if info.is_dir():
            dirs.add("/".join(parts))
    total = _BLOCK * (1 + len(dirs))
    for info in infos:
        if not info.is_dir():
            total += _blocks(info.file_size)
    return total


def disk_bytes(path: Path) -> int:
    """Bytes a file or directory tree takes on disk (allocated blocks; symlinks not
    followed); 0 if it is gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    total = st.st_blocks * 512
    if stat.S_ISDIR(st.st_mode):
        try:
            with os.scandir(path) as entries:
                children = [Path(entry.path) for entry in entries]
        except (FileNotFoundError, NotADirectoryError):
            return total
        total += sum(disk_bytes(child) for child in children)
    return total


def installed_versions(functions_dir: Path) -> dict[str, list[Path]]:
    """Every installed version directory, by function id (dot-named leftovers skipped)."""
    out: dict[str, list[Path]] = {}
    if not functions_dir.is_dir():
        return out
    for function_dir in sorted(functions_dir.iterdir()):
        if function_dir.name.startswith(".") or not _lstat_is(function_dir, stat.S_ISDIR):
            continue
        out[function_dir.name] = [
            entry
            for entry in sorted(function_dir.iterdir())
            if _VERSION_DIR_RE.fullmatch(entry.name) and _lstat_is(entry, stat.S_ISDIR)
        ]
    return out


# -- removal ----------------------------------------------------------------------------------


def cleanup_staging(functions_dir: Path) -> list[Path]:
    """Remove staging and trash leftovers of a crash; returns what was removed.

    Call it at startup, before any install runs: it would also remove the staging
    directory of an install in progress.
    """
    removed: list[Path] = []
    if not functions_dir.is_dir():
        return removed
    for entry in sorted(functions_dir.iterdir()):
        if entry.name.startswith(TRASH_PREFIX):
            _remove_tree(entry)
            removed.append(entry)
        elif not entry.is_symlink() and entry.is_dir():
            for child in sorted(entry.iterdir()):
                if child.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                    _remove_tree(child)
                    removed.append(child)
    for path in removed:
        log.info("removed leftover %s", path)
    return removed


def prune_versions(functions_dir: Path, function_id: str, keep: set[Path]) -> list[Path]:
    """Remove the installed versions of a function not in ``keep``; returns the removed dirs.

    Only real directories named ``<version>-<sha12>`` are touched; anything else is left.
    """
    _check_function_id(function_id)
    function_dir = functions_dir / function_id
    if not function_dir.is_dir() or function_dir.is_symlink():
        return []
    kept = {os.path.realpath(p) for p in keep}
    removed: list[Path] = []
    for entry in sorted(function_dir.iterdir()):
        if not _VERSION_DIR_RE.fullmatch(entry.name) or not _lstat_is(entry, stat.S_ISDIR):
            continue
        if os.path.realpath(entry) in kept:
            continue
        _discard(entry, f"{TRASH_PREFIX}{secrets.token_hex(8)}")
        removed.append(entry)
    return removed


def remove_function(functions_dir: Path, function_id: str) -> bool:
    """Remove a function's whole directory; False if it was not there."""
    _check_function_id(function_id)
    function_dir = functions_dir / function_id
    if not os.path.lexists(function_dir):
        return False
    _discard(function_dir, f"{TRASH_PREFIX}{function_id}-{secrets.token_hex(8)}")
    return True
