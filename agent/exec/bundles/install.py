"""Installing one function version: verify, unpack into staging, activate atomically; and
checking an installed version against the bundle it came from.

A version directory only ever appears by ``os.rename`` of a fully written and fsynced
staging directory. Nothing reads the bundle bytes before their sha256 matched.

Never import or execute bundle code, never follow a symlink, never write outside
``<functions_dir>``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import secrets
import shutil
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

from agent.errors import DeploymentRejected
from agent.exec.bundles.checks import (
    _CORRUPT_ZIP_ERRORS,
    _check_function_id,
    _check_module_is_bundled,
    _check_sha256,
    _check_version,
    _member_parts,
    _normalise_sha256,
    _parse_entrypoint,
    sha256_hex,
)
from agent.exec.bundles.layout import (
    STAGING_PREFIX,
    TRASH_PREFIX,
    _discard,
    _ensure_function_dir,
    _fsync_dir,
    _lstat_is,
    estimated_disk_bytes,
    version_dir,
)
from agent.exec.bundles.unpack import (
    _CHUNK,
    _Budget,
    _check_members,
    _read_limited,
    _reject_member,
    _unpack_zip,
    _write_source,
)

log = logging.getLogger(__name__)

#: Default cap on a bundle's total uncompressed size.
MAX_BUNDLE_BYTES = 50 * 1024 * 1024
#: Default cap on the number of members in a zip bundle (directories included).
MAX_BUNDLE_FILES = 10_000


CODE_FORMATS = ("source", "zip")


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
