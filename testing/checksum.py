"""The wire contract's state checksum, computed independently of ``agent.models``.

Tests compare the agent's checksums against this one, so a change to the agent's canonical
JSON that the cloud (in any language) could not reproduce fails them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def wire_checksum(data: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON: sorted keys, no spaces, UTF-8 as is."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
