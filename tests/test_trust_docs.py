"""docs/protocol.md's signed spec is real: the encoder's output, and it verifies with the
public key printed beside it (and with no other)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent.contract import protocol
from agent.errors import DeploymentRejected
from agent.trust import TrustPolicy

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def _block(marker: str) -> str:
    found = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)\n```", DOC.read_text(), re.S)
    assert found, f"{DOC} has no block after <!-- {marker} -->"
    return found.group(1)


def test_signed_spec_example_verifies_with_the_documented_key(tmp_path: Path) -> None:
    """The signed example was made by the encoder and its signature holds."""
    example = json.loads(_block("signed-spec-example"))
    raw = json.dumps(example, separators=(",", ":"), ensure_ascii=False).encode()
    spec = protocol.decode_spec(raw)
    assert json.loads(protocol.encode_spec(spec)) == example
    assert list(json.loads(protocol.encode_spec(spec))) == list(example)
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o755)
    (keys / "doc.pub").write_text(_block("signed-spec-public-key") + "\n")
    (keys / "doc.pub").chmod(0o644)
    policy = TrustPolicy.from_files([str(keys / "doc.pub")], node_id="gw-1")
    assert policy.check(spec, "fleet") == example["sequence"]
    tampered = protocol.decode_spec(raw.replace(b'"memory_mb":64', b'"memory_mb":65'))
    with pytest.raises(DeploymentRejected, match="does not verify"):
        policy.check(tampered, "fleet")
