"""Deadline polling: the one way the harness waits for a condition.

Owns :func:`wait_for`. Nothing here sleeps to synchronise: it polls a predicate until a
monotonic deadline and reports the miss through :func:`testing.outcomes.fail` with a message
that says what did not happen. It must never wait without a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from testing.outcomes import fail

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None], timeout: float, message: str, *, poll: float = 0.01
) -> T:
    """Poll ``predicate`` until truthy and return its value; fail with ``message`` at the
    deadline (``poll``: the interval between calls, not a synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            fail(f"{message} (within {timeout:g}s)")
        time.sleep(poll)  # polling interval, not synchronisation
