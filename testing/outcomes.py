"""How the harness says that something did not happen, or cannot happen here.

Owns the two outcomes every harness module reports through: a missed deadline
(:func:`fail`) and a missing program such as mosquitto (:func:`skip`). Outside pytest they
raise :class:`WaitTimeout` and :class:`Unavailable`, which scripts catch or let end the run;
``tests/conftest.py`` calls :func:`report_with` so that under pytest they are
``pytest.fail`` (the test fails with the message) and ``pytest.skip``.

It must never import pytest: scripts run the harness without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn


class WaitTimeout(AssertionError):
    """A condition the harness waited for did not hold by its deadline; the message says what."""


class Unavailable(RuntimeError):
    """A program the harness needs (mosquitto, nats-server, rabbitmq-server) is not installed."""


def _raise_timeout(message: str) -> NoReturn:
    raise WaitTimeout(message)


def _raise_unavailable(message: str) -> NoReturn:
    raise Unavailable(message)


_fail: Callable[[str], NoReturn] = _raise_timeout
_skip: Callable[[str], NoReturn] = _raise_unavailable


def report_with(*, fail: Callable[[str], NoReturn], skip: Callable[[str], NoReturn]) -> None:
    """Report missed deadlines with ``fail`` and missing programs with ``skip`` from now on."""
    global _fail, _skip
    _fail, _skip = fail, skip


def fail(message: str) -> NoReturn:
    """Something did not happen: ``message`` says what."""
    _fail(message)


def skip(message: str) -> NoReturn:
    """Something cannot run on this machine: ``message`` says what is missing."""
    _skip(message)
