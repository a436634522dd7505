"""A small filesystem to fill: tests of a full disk mount a tmpfs (root only) and write it
full. Shared by ``tests/test_faults_store.py`` and ``tests/test_outbox_attacks.py``."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "16m") -> Iterator[Path]:
    """``path`` (created) with a tmpfs of ``size`` mounted on it, unmounted (lazily) after;
    the test is skipped when it cannot mount one (not root, no tmpfs)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=False
    )
    if not os.path.ismount(path):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> int:
    """Write zeros into ``path`` until its filesystem is full, to the last block; the bytes
    written."""
    written = 0
    with open(path, "wb", buffering=0) as out:
        for size in (64 * 1024, 512):
            with contextlib.suppress(OSError):
                while True:
                    written += out.write(bytes(size))
    return written
