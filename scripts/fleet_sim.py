"""fleet-sim's entry point: ``python scripts/fleet_sim.py 1000 --port 1883`` (or scripts/fleet-sim).

The simulator itself is :mod:`testing.fleet_sim` (shared with the tests); this file only puts
the repository on ``sys.path`` and runs its ``main``. It must never hold simulator code.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testing.fleet_sim import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
