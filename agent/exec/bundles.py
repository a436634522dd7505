"""Function code on disk: verify, safely unpack, atomically activate, prune.

Owns everything under ``<functions_dir>``::

    <functions_dir>/<function_id>/<version>-<sha12>/     one installed version (immutable)
    <functions_dir>/<function_id>/.staging-<random>/     an install in progress
    <functions_dir>/<function_id>/.trash-<random>/       a version being removed
    <functions_dir>/.trash-<function_id>-<random>/       a function being removed

A version directory only ever appears by ``os.rename`` of a fully written and fsynced
staging directory, and only ever disappears by a rename to ``.trash-*`` before it is
deleted, so a crash can leave dot-named leftovers (removed by :func:`cleanup_staging`)
but never a half-written or half-deleted version under a real version name.

This module must never import or execute bundle code (the worker does that), never follow
a symlink or create one, never write outside ``<functions_dir>``, never call
``ZipFile.extractall``, and never touch the bundle bytes before their sha256 matched.

Errors: a bad bundle or spec value raises :class:`~agent.errors.DeploymentRejected` (the
caller reports it and keeps the old version). Local disk trouble (disk full, permissions)
is not the bundle's fault and propagates as :class:`OSError`.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import importlib.machinery
import io
import logging
import os
import re
import secrets
import shutil
import stat
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from agent.contract import ids
from agent.errors import DeploymentRejected

__all__ = [
    "MAX_BUNDLE_BYTES",
    "MAX_BUNDLE_FILES",
    "cleanup_staging",
    "disk_bytes",
    "estimated_disk_bytes",
    "install_bundle",
    "installed_versions",
    "make_zip_bundle",
    "prune_versions",
    "remove_function",
    "resolves_outside_bundle",
    "sha256_hex",
    "verify_installed",
    "version_dir",
]

log = logging.getLogger(__name__)

#: Default cap on a bundle's total uncompressed size.
MAX_BUNDLE_BYTES = 50 * 1024 * 1024
#: Default cap on the number of members in a zip bundle (directories included).
MAX_BUNDLE_FILES = 10_000

CODE_FORMATS = ("source", "zip")

STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"

# A member whose declared ratio is above this, and which is over _BOMB_MIN_SIZE, is a bomb.
_BOMB_RATIO = 200
_BOMB_MIN_SIZE = 1024 * 1024
_CHUNK = 64 * 1024
# Path limits well inside NAME_MAX (255) and PATH_MAX (4096) with the staging prefix.
_MAX_COMPONENT_BYTES = 255
_MAX_MEMBER_NAME_BYTES = 1024

# Function ids, versions and digests follow the wire contract's rules (agent.contract.ids).
_VERSION_DIR_RE = re.compile(r"(?P<version>.+)-(?P<sha12>[0-9a-f]{12})")
_DRIVE_RE = re.compile(r"[A-Za-z]:")

# Only stored and deflated: zipfile bounds deflate output per read, but decompresses a
# whole bzip2/lzma chunk at once, so a tiny chunk could blow up the agent's memory.
_ALLOWED_COMPRESSION = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
# General-purpose flag bits: 0 encrypted, 5 compressed patched data, 6 strong encryption.
_UNSUPPORTED_FLAGS = 0x01 | 0x20 | 0x40

# What reading untrusted zip bytes from memory can raise. The archive lives in a BytesIO,
# so an OSError here comes from a decoder, never from the disk.
_CORRUPT_ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    EOFError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    OSError,
)


# -- validation of plain values --------------------------------------------------------------


def _check_function_id(function_id: str) -> None:
    try:
        ids.check_function_id(function_id)
    except ValueError as exc:
        raise DeploymentRejected(str(exc)) from None


def _check_version(version: str) -> None:
    """Versions become part of a path: the contract's rule keeps them inside the function dir
    (no separator, NUL or leading ".", so never "." or "..")."""
    try:
        ids.check_version(version)
    except ValueError as exc:
        raise DeploymentRejected(str(exc)) from None


def _normalise_sha256(sha256: str) -> str:
    if not ids.is_valid_sha256(sha256):
        raise DeploymentRejected(f"invalid sha256 {sha256!r}: expected 64 hex digits")
    return sha256.lower()


def _parse_entrypoint(entrypoint: str, code_format: str) -> list[str]:
    """The module path of ``module:attr`` as a list of identifiers."""
    module, sep, attr = entrypoint.partition(":")
    parts = module.split(".")
    if (
        not sep
        or not all(_is_identifier(p) for p in parts)
        or not all(_is_identifier(a) for a in attr.split("."))
    ):
        raise DeploymentRejected(f'invalid entrypoint {entrypoint!r}: expected "module:attr"')
    if code_format == "source" and len(parts) != 1:
        raise DeploymentRejected(
            f"invalid entrypoint {entrypoint!r}: a source bundle is one module, "
            "so the module must be a single name without dots"
        )
    return parts


def _is_identifier(name: str) -> bool:
    # ASCII only: import normalises non-ASCII identifiers (NFKC), file names are not.
    return name.isascii() and name.isidentifier()


def _check_sha256(raw: bytes, expected: str) -> None:
    actual = hashlib.sha256(raw).hexdigest()
    if not hmac.compare_digest(actual, expected):
        raise DeploymentRejected(f"sha256 mismatch: expected {expected}, got {actual}")


def _member_parts(name: str) -> list[str]:
    """The path components of a zip member name; raises ValueError saying what is unsafe."""
    if "\x00" in name:
        raise ValueError("name contains NUL")
    if not name or name == "/":
        raise ValueError("empty name")
    if "\\" in name:
        raise ValueError("name contains a backslash")
    if name.startswith("/"):
        raise ValueError("absolute path")
    if _DRIVE_RE.match(name):
        raise ValueError("drive letter")
    if len(name.encode("utf-8", "surrogatepass")) > _MAX_MEMBER_NAME_BYTES:
        raise ValueError(f"name longer than {_MAX_MEMBER_NAME_BYTES} bytes")
    parts = name.removesuffix("/").split("/")
    for part in parts:
        if part == "..":
            raise ValueError('".." component')
        if part in ("", "."):
            raise ValueError("empty or '.' component")
        if len(part.encode("utf-8", "surrogatepass")) > _MAX_COMPONENT_BYTES:
            raise ValueError(f"component longer than {_MAX_COMPONENT_BYTES} bytes")
    return parts


# -- paths ------------------------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of ``data``, as function specs carry it."""
    return hashlib.sha256(data).hexdigest()


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


# -- install ----------------------------------------------------------------------------------


def install_bundle(
    functions_dir: Path,
    function_id: str,
    version: str,
    code_format: str,
    raw: bytes,
    sha256: str,
    entrypoint: str,
    *,
    max_bytes: int,
    max_files: int,
    check_space: Callable[[int], None] | None = None,
) -> Path:
    """Verify and unpack one function version; return its directory.

    ``raw`` is the source text (``code_format="source"``) or the zip (``"zip"``) exactly as
    hashed by ``sha256``. Re-installing the same version and digest returns the existing
    directory untouched. Raises DeploymentRejected for anything wrong with the inputs.

    ``check_space(estimate)`` is called with the bytes the unpacked version will take on
    disk (:func:`estimated_disk_bytes`) before anything is written, and may raise
    DeploymentRejected (a quota); it is not called when the version is already installed.
    """
    _check_function_id(function_id)
    _check_version(version)
    if code_format not in CODE_FORMATS:
        raise DeploymentRejected(f"unknown code format {code_format!r}: expected source or zip")
    module_parts = _parse_entrypoint(entrypoint, code_format)
    expected = _normalise_sha256(sha256)
    # Nothing reads the bytes before the digest matched.
    _check_sha256(raw, expected)

    _check_module_is_bundled(module_parts, entrypoint)

    target = version_dir(functions_dir, function_id, version, expected)
    if _lstat_is(target, stat.S_ISDIR):
        # Idempotent re-delivery, unless someone changed the installed files meanwhile:
        # then the version is installed again from the verified bytes.
        # The spec's entrypoint may have changed: the module must still be there.
        _check_entrypoint_module(target, module_parts, entrypoint)
        problem = verify_installed(
            target, code_format, raw, entrypoint, max_bytes=max_bytes, max_files=max_files
        )
        if problem is None:
            return target
        log.warning("reinstalling %s %s: %s", function_id, version, problem)
        _discard(target, f"{TRASH_PREFIX}{secrets.token_hex(8)}")

    if check_space is not None:
        check_space(estimated_disk_bytes(code_format, raw))
    function_dir = _ensure_function_dir(functions_dir, function_id)
    staging = _make_staging_dir(function_dir)
    try:
        if code_format == "source":
            created_dirs = _write_source(staging, raw, module_parts[0], max_bytes=max_bytes)
        else:
            created_dirs = _unpack_zip(staging, raw, max_bytes=max_bytes, max_files=max_files)
        _check_entrypoint_module(staging, module_parts, entrypoint)
        # Deepest first, so each directory entry is durable before its parent's.
        for path in sorted(created_dirs, key=lambda p: len(p.parts), reverse=True):
            _fsync_dir(path)
        os.chmod(staging, 0o755)
        _fsync_dir(staging)
        try:
            os.rename(staging, target)
        except OSError as exc:
            # Someone installed the same version meanwhile: theirs is just as good.
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and _lstat_is(target, stat.S_ISDIR):
                return target
            raise
        _fsync_dir(function_dir)
        return target
    finally:
        if os.path.lexists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def _make_staging_dir(function_dir: Path) -> Path:
    while True:
        path = function_dir / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path


def _write_source(staging: Path, raw: bytes, module: str, *, max_bytes: int) -> list[Path]:
    if len(raw) > max_bytes:
        raise DeploymentRejected(f"source is {len(raw)} bytes, over the limit of {max_bytes}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeploymentRejected(f"source is not valid UTF-8: {exc}") from exc
    _write_file(staging / f"{module}.py", [raw])
    return []


def _write_file(path: Path, chunks: Iterable[bytes]) -> None:
    """Create ``path`` (never an existing file, never through a symlink), mode 0644, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, 0o644)
        for chunk in chunks:
            out.write(chunk)
        out.flush()
        os.fsync(fd)


def _check_entrypoint_module(root: Path, module_parts: list[str], entrypoint: str) -> None:
    """``pkg/mod.py`` or ``pkg/mod/__init__.py`` must be a regular file, ``pkg`` a real dir."""
    parent = root
    for package in module_parts[:-1]:
        parent = parent / package
        if not _lstat_is(parent, stat.S_ISDIR):
            break
    else:
        leaf = module_parts[-1]
        if _lstat_is(parent / f"{leaf}.py", stat.S_ISREG) or (
            _lstat_is(parent / leaf, stat.S_ISDIR)
            and _lstat_is(parent / leaf / "__init__.py", stat.S_ISREG)
        ):
            return
    module = ".".join(module_parts)
    raise DeploymentRejected(f"entrypoint module {module!r} ({entrypoint}) not found in bundle")


def _check_module_is_bundled(module_parts: list[str], entrypoint: str) -> None:
    """The worker puts the bundle first on ``sys.path`` and imports the entrypoint's module,
    but a name the interpreter already knows (``os``, ``json``, an installed package) comes
    from ``sys.modules`` or the standard library instead: ``os:system`` would run a shell.
    Refuse any top-level name that resolves without the bundle."""
    top = module_parts[0]
    where = resolves_outside_bundle(top)
    if where is not None:
        raise DeploymentRejected(
            f"entrypoint {entrypoint!r}: module {top!r} is {where}, so the worker would "
            "import that instead of the bundle's code; give the bundle's module another name"
        )


def resolves_outside_bundle(name: str) -> str | None:
    """What an importable top-level module ``name`` is outside any bundle, or None.

    Namespace packages (a bare directory on ``sys.path``) do not count: a bundle's regular
    module or package comes first on the worker's path and wins over them.
    """
    if name in sys.builtin_module_names:
        return "a built-in module"
    if name in sys.stdlib_module_names:
        return "a standard library module"
    if name in sys.modules:
        return "a module the agent has loaded"
    try:
        spec = importlib.machinery.PathFinder.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is not None and spec.origin is not None and spec.origin != "namespace":
        return f"installed at {spec.origin}"
    return None


def expected_files(
    code_format: str, raw: bytes, entrypoint: str, *, max_bytes: int, max_files: int
) -> dict[str, str]:
    """The manifest of a bundle: ``relative path -> sha256`` of every file it installs,
    computed from the (already verified) bundle bytes, never from the disk."""
    module_parts = _parse_entrypoint(entrypoint, code_format)
    if code_format == "source":
        return {f"{module_parts[0]}.py": sha256_hex(raw)}
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except _CORRUPT_ZIP_ERRORS as exc:
        raise DeploymentRejected(f"corrupt zip: {exc}") from exc
    files: dict[str, str] = {}
    with archive:
        infos = archive.infolist()
        _check_members(infos, max_bytes=max_bytes, max_files=max_files)
        budget = _Budget(max_bytes)
        for info in infos:
            if info.is_dir():
                continue
            digest = hashlib.sha256()
            try:
                src = archive.open(info)
            except _CORRUPT_ZIP_ERRORS as exc:
                raise _reject_member(info, f"corrupt zip: {exc}") from exc
            with src:
                for chunk in _read_limited(src, info, budget):
                    digest.update(chunk)
            files["/".join(_member_parts(info.orig_filename))] = digest.hexdigest()
    return files


def installed_files(root: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``root`` as it is on disk now; a
    symlink or other special file is listed as ``"<not a regular file>"``."""
    files: dict[str, str] = {}

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                name = f"{prefix}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    walk(Path(entry.path), f"{name}/")
                elif entry.is_file(follow_symlinks=False):
                    digest = hashlib.sha256()
                    fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    with os.fdopen(fd, "rb") as handle:
                        while chunk := handle.read(_CHUNK):
                            digest.update(chunk)
                    files[name] = digest.hexdigest()
                else:
                    files[name] = "<not a regular file>"

    walk(root, "")
    return files


def verify_installed(
    code_dir: Path,
    code_format: str,
    raw: bytes,
    entrypoint: str,
    *,
    max_bytes: int = MAX_BUNDLE_BYTES,
    max_files: int = MAX_BUNDLE_FILES,
) -> str | None:
    """Compare an installed version with the bundle it came from; None when identical,
    else what differs (a changed, missing or extra file, which ``.pyc`` files also are)."""
    if not _lstat_is(code_dir, stat.S_ISDIR):
        return f"installed code {code_dir} is missing"
    try:
        want = expected_files(
            code_format, raw, entrypoint, max_bytes=max_bytes, max_files=max_files
        )
        have = installed_files(code_dir)
    except (DeploymentRejected, OSError) as exc:
        return f"installed code {code_dir} cannot be checked: {exc}"
    for name in sorted(set(want) | set(have)):
        if name not in have:
            return f"installed code {code_dir}: {name} is missing"
        if name not in want:
            return f"installed code {code_dir}: {name} was added after install"
        if want[name] != have[name]:
            return f"installed code {code_dir}: {name} was modified after install"
    return None


def _lstat_is(path: Path, predicate: Callable[[int], bool]) -> bool:
    """``predicate(mode)`` of ``path`` itself (a symlink is never a dir or regular file)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    return predicate(mode)


# -- zip --------------------------------------------------------------------------------------


def _reject_member(info: zipfile.ZipInfo, why: str) -> DeploymentRejected:
    return DeploymentRejected(f"zip member {info.orig_filename!r} rejected: {why}")


def _check_members(infos: list[zipfile.ZipInfo], *, max_bytes: int, max_files: int) -> None:
    """Everything decidable from the central directory, before a byte is decompressed."""
    if len(infos) > max_files:
        raise DeploymentRejected(f"zip has {len(infos)} members, over the limit of {max_files}")
    files: set[str] = set()
    dirs: set[str] = set()
    declared_total = 0
    for info in infos:
        try:
            parts = _member_parts(info.orig_filename)
        except ValueError as exc:
            raise _reject_member(info, str(exc)) from None
        key = "/".join(parts)
        if key in files or key in dirs:
            raise _reject_member(info, "duplicate name")
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if stat.S_ISLNK(mode):
            raise _reject_member(info, "symlink")
        if info.is_dir():
            if kind not in (0, stat.S_IFDIR):
                raise _reject_member(info, f"not a directory (mode {mode:o})")
            if info.file_size:
                raise _reject_member(info, "directory entry with data")
            dirs.add(key)
        else:
            if kind not in (0, stat.S_IFREG):
                raise _reject_member(info, f"not a regular file (mode {mode:o})")
            files.add(key)
        for depth in range(1, len(parts)):
            dirs.add("/".join(parts[:depth]))
        if info.flag_bits & _UNSUPPORTED_FLAGS:
            raise _reject_member(info, "encrypted or patched data")
        if info.compress_type not in _ALLOWED_COMPRESSION:
            raise _reject_member(info, f"compression method {info.compress_type} not allowed")
        if info.file_size > _BOMB_MIN_SIZE and info.file_size > _BOMB_RATIO * info.compress_size:
            raise _reject_member(
                info,
                f"compression ratio over {_BOMB_RATIO}:1 "
                f"({info.file_size} bytes from {info.compress_size})",
            )
        declared_total += info.file_size
        if declared_total > max_bytes:
            raise DeploymentRejected(
                f"zip declares more than {max_bytes} bytes uncompressed "
                f"(at member {info.orig_filename!r})"
            )
    clash = files & dirs
    if clash:
        raise DeploymentRejected(f"zip member {min(clash)!r} rejected: both a file and a directory")


def _unpack_zip(staging: Path, raw: bytes, *, max_bytes: int, max_files: int) -> list[Path]:
    """Unpack into ``staging``; return the directories created (to fsync)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except _CORRUPT_ZIP_ERRORS as exc:
        raise DeploymentRejected(f"corrupt zip: {exc}") from exc
    with archive:
        infos = archive.infolist()
        _check_members(infos, max_bytes=max_bytes, max_files=max_files)
        created: set[Path] = set()
        budget = _Budget(max_bytes)
        for info in infos:
            parts = _member_parts(info.orig_filename)
            path = staging.joinpath(*parts)
            # Belt and braces: the checks above already make this impossible.
            if os.path.commonpath([staging, path]) != str(staging):
                raise _reject_member(info, "escapes the bundle directory")
            for depth in range(1, len(parts) + (1 if info.is_dir() else 0)):
                parent = staging.joinpath(*parts[:depth])
                if parent not in created:
                    _mkdir(parent)
                    created.add(parent)
            if not info.is_dir():
                _extract_member(archive, info, path, budget)
    return sorted(created)


class _Budget:
    """Counts bytes actually decompressed against the bundle limit (headers can lie)."""

    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes

    def take(self, n: int, info: zipfile.ZipInfo) -> None:
        self.left -= n
        if self.left < 0:
            raise _reject_member(info, "bundle exceeds the uncompressed size limit")


def _extract_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, budget: _Budget
) -> None:
    try:
        src = archive.open(info)
    except _CORRUPT_ZIP_ERRORS as exc:
        raise _reject_member(info, f"corrupt zip: {exc}") from exc
    with src:
        _write_file(path, _read_limited(src, info, budget))


def _read_limited(src: IO[bytes], info: zipfile.ZipInfo, budget: _Budget) -> Iterable[bytes]:
    """Chunks of one member, checked against its declared size, its ratio and the budget."""
    written = 0
    while True:
        try:
            chunk = src.read(_CHUNK)
        except _CORRUPT_ZIP_ERRORS as exc:
            raise _reject_member(info, f"corrupt zip: {exc}") from exc
        if not chunk:
            return
        written += len(chunk)
        if written > info.file_size:
            raise _reject_member(info, f"more data than the declared {info.file_size} bytes")
        if written > _BOMB_MIN_SIZE and written > _BOMB_RATIO * info.compress_size:
            raise _reject_member(info, f"compression ratio over {_BOMB_RATIO}:1")
        budget.take(len(chunk), info)
        yield chunk


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


# -- cloud / operator side --------------------------------------------------------------------

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def make_zip_bundle(path: Path) -> bytes:
    """Zip a directory as deterministic bundle bytes (same tree, same bytes).

    Names are sorted, timestamps fixed, modes 0644; symlinks and other non-regular files
    are skipped (never followed), as are ``__pycache__`` and ``*.pyc``. Raises ValueError
    for a name :func:`install_bundle` would refuse.
    """
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "bundle source is not a directory", str(path))
    members: list[tuple[str, Path]] = []
    _collect(path, (), members)
    members.sort()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, file in members:
            try:
                _member_parts(name)
            except ValueError as exc:
                raise ValueError(f"cannot bundle {name!r}: {exc}") from None
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.create_system = 3  # unix, whatever platform builds it
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, file.read_bytes(), compresslevel=9)
    return buffer.getvalue()


def _collect(root: Path, prefix: tuple[str, ...], out: list[tuple[str, Path]]) -> None:
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_symlink():
                continue
            if entry.is_dir(follow_symlinks=False):
                if entry.name != "__pycache__":
                    _collect(Path(entry.path), (*prefix, entry.name), out)
            elif entry.is_file(follow_symlinks=False) and not entry.name.endswith(".pyc"):
                out.append(("/".join((*prefix, entry.name)), Path(entry.path)))
