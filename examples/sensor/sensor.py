"""The demo's function: Celsius in, Fahrenheit out, plus where it ran."""

import os


def handler(event):
    return {
        "processed": True,
        "value": event["temperature"] * 1.8 + 32,
        "worker_pid": os.getpid(),
    }
