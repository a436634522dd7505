"""The .deb under a booted systemd: build it, install it in a Debian 12 container, run it.

scripts/build-deb makes two packages (the second with a bumped version, for the upgrade);
tests/nspawn.py boots a cached debootstrap root through an overlay with
``systemd-nspawn --boot``; inside, a oneshot unit runs tests/deb_guest.py, which installs
the package with apt, checks the service, the broker, the watchdog, reload, the journal,
the workers' sandbox, the upgrade and the purge, each timed, writes results.json and
powers the container off. Here we only read the results.

Deselect with ``-m "not systemd_boot"``. Needs root; the first run also builds the cached
root (about a minute, Debian's packages from the network).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nspawn  # tests/ is not a package

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = "/edge-agent-test"
WATCHDOG_SEC = 3
BOOT_TIMEOUT_S = 300.0

pytestmark = [pytest.mark.systemd_boot, pytest.mark.slow]

GUEST_UNIT = f"""\
[Unit]
Description=edge-agent package checks (tests/deb_guest.py)
Wants=mosquitto.service
After=mosquitto.service

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 {GUEST_DIR}/deb_guest.py
# Whatever happens to the checks, the container powers off and the host reads the results.
ExecStopPost=/usr/bin/systemctl --no-block poweroff
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""


def build_deb(out: Path, version: str | None) -> Path:
    env = {**os.environ}
    if version is not None:
        env["EDGE_AGENT_DEB_VERSION"] = version
    log = out / f"build-deb-{version or 'default'}.log"
    with log.open("w") as err:
        result = subprocess.run(
            [str(REPO / "scripts" / "build-deb"), "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
    if result.returncode != 0:
        pytest.fail(f"scripts/build-deb failed ({result.returncode}):\n{log.read_text()[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def render(results: dict[str, Any], phases: dict[str, float]) -> str:
    lines = ["host phases:"]
    lines += [f"  {name:<28} {seconds:7.2f} s" for name, seconds in phases.items()]
    lines.append("checks inside the container:")
    for check in results.get("checks", []):
        mark = "ok  " if check["ok"] else "FAIL"
        lines.append(
            f"  {mark} {check['name']:<22} {check['seconds']:7.2f} s  {check.get('detail', '')}"
        )
    lines.append("facts: " + json.dumps(results.get("facts", {}), sort_keys=True))
    return "\n".join(lines)


@dataclass(frozen=True)
class Built:
    deb_v1: Path
    deb_v2: Path
    version_v1: str
    version_v2: str
    base: nspawn.CachedRoot
    phases: dict[str, float]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Both packages and the cached root, made side by side (they are independent)."""
    if os.geteuid() != 0:
        pytest.skip("debootstrap, mount and systemd-nspawn need root")
    missing = nspawn.missing_tools()
    assert not missing, f"missing {missing}: run scripts/bootstrap"
    upstream = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    version_v2 = f"{upstream}+boottest1"
    debs = tmp_path_factory.mktemp("debs")
    started = time.monotonic()

    def build_timed(version: str | None) -> tuple[Path, float]:
        return build_deb(debs, version), time.monotonic() - started

    with ThreadPoolExecutor(max_workers=2) as pool:
        v1 = pool.submit(build_timed, None)
        v2 = pool.submit(build_timed, version_v2)
        base = nspawn.cached_root()
        (deb_v1, v1_s), (deb_v2, v2_s) = v1.result(), v2.result()
    phases = {
        "cached root (built now)" if base.built_now else "cached root (warm)": base.seconds,
        "build-deb x2 (in parallel)": max(v1_s, v2_s),
        "all of the above (overlapped)": time.monotonic() - started,
    }
    assert deb_v1.name.startswith(f"edge-agent_{upstream}_"), deb_v1.name
    return Built(deb_v1, deb_v2, upstream, version_v2, base, phases)


def test_deb_is_lintian_clean(built: Built) -> None:
    """lintian finds no error or warning beyond packaging/debian/lintian-overrides."""
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(built.deb_v1)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert (result.returncode, tags) == (0, []), f"lintian:\n{result.stdout}{result.stderr}"


def test_deb_installs_runs_upgrades_and_purges_under_booted_systemd(
    built: Built, tmp_path: Path
) -> None:
    """The package works under a real systemd: notify, watchdog, reload, journal, upgrade, purge."""
    deb_v1, deb_v2, base = built.deb_v1, built.deb_v2, built.base
    upstream, version_v2 = built.version_v1, built.version_v2
    phases = dict(built.phases)
    started = time.monotonic()

    out = tmp_path / "out"
    out.mkdir()
    node_id = f"Gw-Boot-{uuid.uuid4().hex[:6]}"
    machine = f"eat-{uuid.uuid4().hex[:10]}"
    with nspawn.overlay_root(base.path, tmp_path / "run") as root:
        guest = root / GUEST_DIR.lstrip("/")
        guest.mkdir()
        for deb in (deb_v1, deb_v2):
            shutil.copy2(deb, guest / deb.name)
        shutil.copy2(REPO / "tests" / "deb_guest.py", guest / "deb_guest.py")
        params = {
            "deb_v1": f"{GUEST_DIR}/{deb_v1.name}",
            "deb_v2": f"{GUEST_DIR}/{deb_v2.name}",
            "version_v1": upstream,
            "version_v2": version_v2,
            "node_id": node_id,
            "watchdog_sec": WATCHDOG_SEC,
        }
        (guest / "params.json").write_text(json.dumps(params))
        # postinst derives node.id from the short host name.
        (root / "etc" / "hostname").write_text(f"{node_id}.example.lan\n")
        units = root / "etc" / "systemd" / "system"
        (units / "edge-agent-test.service").write_text(GUEST_UNIT)
        (units / "multi-user.target.wants" / "edge-agent-test.service").symlink_to(
            "/etc/systemd/system/edge-agent-test.service"
        )
        booted = nspawn.boot(
            root,
            tmp_path / "console.log",
            timeout=BOOT_TIMEOUT_S,
            binds=((out, f"{GUEST_DIR}/out"),),
            machine=machine,
        )
        phases["boot + checks + poweroff"] = booted.seconds
    phases["total (with the builds)"] = (
        time.monotonic() - started + built.phases["all of the above (overlapped)"]
    )

    assert not os.path.ismount(tmp_path / "run" / "merged"), "the overlay is still mounted"
    assert not (Path("/run/systemd/nspawn/propagate") / machine).exists(), "nspawn left its dir"
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    report = render(results, phases)
    (tmp_path / "report.txt").write_text(report + "\n")
    print(report)

    def journal_tail() -> str:
        path = out / "journal.txt"
        text = path.read_text(errors="replace") if path.exists() else "(no journal)"
        console = booted.console.read_text(errors="replace")[-2000:]
        return f"--- journal (tail) ---\n{text[-6000:]}\n--- console (tail) ---\n{console}"

    assert not booted.timed_out, (
        f"the container did not power off within {BOOT_TIMEOUT_S:g} s\n{report}\n{journal_tail()}"
    )
    assert results, (
        f"the guest wrote no results (nspawn exit {booted.returncode})\n{journal_tail()}"
    )
    failed = [c for c in results["checks"] if not c["ok"]]
    assert not failed, (
        f"check {failed[0]['name']} failed:\n{failed[0]['error']}\n{report}\n{journal_tail()}"
    )
    assert results["done"], f"the guest stopped early\n{report}\n{journal_tail()}"
