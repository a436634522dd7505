"""Booted Debian 12 containers for package tests: a cached debootstrap root, an overlay per
run, and ``systemd-nspawn --boot`` under a deadline.

Owns: the root cache (``/var/cache/edge-agent-tests``, or ``$EDGE_AGENT_TEST_CACHE``), which is
built once with debootstrap plus the packages a run needs offline, and the lifetime of one
booted container: its overlay mount, its nspawn process, its leftovers.

Must never: write into the cached root (every run gets an overlay whose upper layer is
thrown away); leave a mount, a process or an nspawn propagation directory behind, even when
the boot times out or the test fails; give the container a network (``--private-network``:
it sees only its own loopback, so its broker cannot clash with the host's ports). Only the
cache build reaches the network, for Debian's packages.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(os.environ.get("EDGE_AGENT_TEST_CACHE", "/var/cache/edge-agent-tests"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_INCLUDE = ("systemd", "systemd-sysv", "dbus")
# What a run installs offline: the broker and its clients, and the .deb's dependencies
# (apt resolves them from the root's package lists but never has to download one).
GUEST_PACKAGES = (
    "mosquitto",
    "mosquitto-clients",
    "python3.11",
    "python3-systemd",
    "libgcc-s1",
    "procps",
)
# Bump to rebuild every cached root (the key also covers the package lists above).
RECIPE = 1
TOOLS = ("debootstrap", "systemd-nspawn", "setpriv", "dpkg-deb")


class NspawnError(RuntimeError):
    """The root could not be built, or the container could not be run to the end."""


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _run(cmd: list[str], log: Path, timeout: float, what: str) -> None:
    with log.open("ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            result = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise NspawnError(f"{what}: still running after {timeout:g} s (log: {log})") from None
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise NspawnError(f"{what}: exit {result.returncode} (log: {log}):\n{tail}")


def cache_key() -> str:
    text = repr((RECIPE, SUITE, BASE_INCLUDE, GUEST_PACKAGES))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class CachedRoot:
    path: Path
    built_now: bool
    seconds: float


def cached_root() -> CachedRoot:
    """The read-only base root for this recipe, built (about a minute) if it is missing.

    A file lock serialises builders; the root is built in a scratch directory next to its
    final place and renamed there only when complete, so a killed build leaves no root
    that looks usable.
    """
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    final = CACHE_DIR / f"{SUITE}-{cache_key()}"
    started = time.monotonic()
    with (CACHE_DIR / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "root" / "etc" / "os-release").exists():
            return CachedRoot(final / "root", False, time.monotonic() - started)
        for stale in CACHE_DIR.glob(f"{SUITE}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # other recipes, killed builds
        scratch = CACHE_DIR / f".build-{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        try:
            _build_root(scratch)
            scratch.rename(final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return CachedRoot(final / "root", True, time.monotonic() - started)


def _build_root(scratch: Path) -> None:
    root, log = scratch / "root", scratch / "build.log"
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_INCLUDE)}",
            SUITE,
            str(root),
            MIRROR,
        ],
        log,
        600,
        "debootstrap",
    )
    # Not booted: the packages' postinst scripts see no running systemd and start
    # nothing; the host's network is shared for the downloads only.
    apt = "DEBIAN_FRONTEND=noninteractive apt-get -qq -o Dpkg::Use-Pty=0"
    script = (
        f"set -e; {apt} update; "
        f"{apt} install -y --no-install-recommends {' '.join(GUEST_PACKAGES)}; "
        f"{apt} clean"
    )
    _run(
        [
            "systemd-nspawn",
            "--quiet",
            "--register=no",
            "--keep-unit",
            f"--machine=eat-build-{uuid.uuid4().hex[:8]}",
            "-D",
            str(root),
            "/bin/sh",
            "-c",
            script,
        ],
        log,
        600,
        "installing the guest packages",
    )


@dataclass
class Boot:
    """What one boot left: nspawn's exit code, its console log and how long it ran."""

    returncode: int | None
    console: Path
    seconds: float
    timed_out: bool


@contextlib.contextmanager
def overlay_root(base: Path, workdir: Path) -> Iterator[Path]:
    """A writable copy-on-write view of ``base``; unmounted and deleted on exit."""
    upper, work, merged = workdir / "upper", workdir / "work", workdir / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={base},upperdir={upper},workdir={work}",
            str(merged),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield merged
    finally:
        _unmount(merged)
        shutil.rmtree(upper, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _unmount(path: Path) -> None:
    result = subprocess.run(["umount", str(path)], capture_output=True, timeout=30, check=False)
    if result.returncode != 0 and os.path.ismount(path):
        # Busy (a process still holds it): detach now, the kernel frees it when released.
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True, timeout=30)
    if os.path.ismount(path):
        raise NspawnError(f"{path} is still mounted: {result.stderr.decode(errors='replace')}")


def boot(
    root: Path,
    console: Path,
    *,
    timeout: float,
    binds: tuple[tuple[Path, str], ...] = (),
    machine: str | None = None,
) -> Boot:
    """Boot ``root`` until it powers off by itself, or kill it at the deadline.

    ``--register=no --keep-unit``: the host has no system bus (no machined, no transient
    scope); the container stays in the test's own cgroup. ``setpriv --pdeathsig`` takes the
    container down with the test process if that dies first.
    """
    name = machine or f"eat-{uuid.uuid4().hex[:10]}"
    cmd = [
        "setpriv",
        "--pdeathsig",
        "KILL",
        "--",
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--private-network",
        f"--machine={name}",
        "--console=pipe",
        "-D",
        str(root),
        *[f"--bind={host}:{guest}" for host, guest in binds],
        "--boot",
    ]
    started = time.monotonic()
    timed_out = False
    with console.open("ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                # SIGTERM: nspawn asks the container's systemd to power off (SIGRTMIN+3).
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(20)
            # nspawn removes this itself, except when killed.
            shutil.rmtree(Path("/run/systemd/nspawn/propagate") / name, ignore_errors=True)
    return Boot(proc.returncode, console, time.monotonic() - started, timed_out)
