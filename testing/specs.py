"""Function specs as the cloud publishes them, for tests and benchmarks (the JSON form).

One builder for ``format: source`` and one for ``format: zip``; callers override any field
with keyword arguments (``concurrency=4``, ``timeout_seconds=60``).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any


def source_spec(
    fid: str, source: str, *, version: str = "1", entrypoint: str | None = None, **over: Any
) -> dict[str, Any]:
    """A function spec with ``format: source`` (module name = the function id's)."""
    module = entrypoint.split(":")[0] if entrypoint else f"mod_{fid.replace('-', '_')}"
    spec: dict[str, Any] = {
        "id": fid,
        "name": fid,
        "version": version,
        "entrypoint": entrypoint or f"{module}:handler",
        "code": {
            "format": "source",
            "data": source,
            "sha256": hashlib.sha256(source.encode()).hexdigest(),
        },
        "memory_mb": 64,
        "timeout_seconds": 5,
    }
    spec.update(over)
    return spec


def zip_spec(fid: str, zip_bytes: bytes, entrypoint: str, **over: Any) -> dict[str, Any]:
    """A function spec with ``format: zip`` carrying ``zip_bytes``."""
    spec = source_spec(fid, "", entrypoint=entrypoint, **over)
    spec["code"] = {
        "format": "zip",
        "data": base64.b64encode(zip_bytes).decode(),
        "sha256": hashlib.sha256(zip_bytes).hexdigest(),
    }
    return spec
