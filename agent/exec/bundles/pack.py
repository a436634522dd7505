"""The packing side: a directory zipped as deterministic bundle bytes (the cloud's
:mod:`agent.cloud.specs` and operators build bundles with it).

Never writes to the disk, never follows a symlink, and never packs a name the installing
side (:func:`agent.exec.bundles.install_bundle`) would refuse.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import zipfile
from pathlib import Path

from agent.exec.bundles.checks import _member_parts

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
