"""Handler modules on disk for the fleet controller and edgectl tests.

The simulated fleet (:func:`testing.fleet_sim.sim_fleet`), the controller's connect and
:func:`testing.cloud.wait_status` live in the shared harness; only what no script needs stays
here. It must never import from scripts/.
"""

from __future__ import annotations

from pathlib import Path


def versioned_module(directory: Path, version: str, *, broken: bool = False) -> Path:
    """``versioned.py`` answering its version and pid; ``broken`` fails at import time."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "versioned.py"
    lines = ["import os", ""]
    if broken:
        lines.append(f"raise RuntimeError('version {version} cannot start')")
    lines += [
        f"VERSION = {version!r}",
        "",
        "",
        "def handler(event):",
        "    return {'version': VERSION, 'pid': os.getpid()}",
        "",
    ]
    path.write_text("\n".join(lines))
    return path
