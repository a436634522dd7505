from __future__ import annotations


def celsius_to_fahrenheit(celsius: float) -> float:
    return celsius * 1.8 + 32
