"""What every part of ``edgectl`` shares: the exit codes scripts read, the usage error and
the ``EDGECTL_*`` environment defaults.

Must never: import the controller, the broker client or rich (``edgectl --help`` and
``--version`` stay fast).
"""

from __future__ import annotations

import os

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4


class UsageError(Exception):
    """Bad input from the command line (exit 2)."""


def env(name: str, default: str) -> str:
    return os.environ.get(f"EDGECTL_{name}", default)
