"""Packaged handler code for the runtime tests: loaded by entrypoint, never imported by tests."""

from __future__ import annotations

import os

from sensor_lib.convert import celsius_to_fahrenheit


def fahrenheit(event: dict[str, float]) -> dict[str, object]:
    return {"processed": True, "value": celsius_to_fahrenheit(event["temperature"])}


def where() -> str:
    """The file this module was loaded from (a directory or a zip member)."""
    return __file__


def env(name: str) -> str | None:
    return os.environ.get(name)


class Gauge:
    @staticmethod
    def read(scale: float) -> float:
        return 42.0 * scale
