"""Safe unpacking: a verified bundle's bytes written into a staging directory.

Everything decidable from a zip's central directory is checked before a byte is
decompressed (names, duplicates, file types, encryption, compression method, declared
sizes and ratios); then each member is streamed in bounded chunks against its declared
size, its ratio and the whole bundle's budget (headers can lie). Files are created with
``O_EXCL | O_NOFOLLOW``, mode 0644, and fsynced.

Never call ``ZipFile.extractall``, never follow or create a symlink, never write outside the
staging directory, and never import or execute what is unpacked.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from agent.errors import DeploymentRejected
from agent.exec.bundles.checks import _CORRUPT_ZIP_ERRORS, _member_parts
from agent.exec.bundles.layout import _mkdir

# A member whose declared ratio is above this, and which is over _BOMB_MIN_SIZE, is a bomb.
_BOMB_RATIO = 200
_BOMB_MIN_SIZE = 1024 * 1024
_CHUNK = 64 * 1024


# Only stored and deflated: zipfile bounds deflate output per read, but decompresses a
# whole bzip2/lzma chunk at once, so a tiny chunk could blow up the agent's memory.
_ALLOWED_COMPRESSION = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
# General-purpose flag bits: 0 encrypted, 5 compressed patched data, 6 strong encryption.
_UNSUPPORTED_FLAGS = 0x01 | 0x20 | 0x40


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
