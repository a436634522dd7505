"""Inputs too big for the gateway: specs and invocations of hundreds of MB.

Before issue 12 a refused 100 MB retained spec took the agent's peak RSS to 861 MB (200 MB:
1.8 GB, again on every reconnect), and invokes of 50 and 200 MB peaked at 189 and 647 MB
before their ``bad_request``. Now the agent announces an MQTT 5 Maximum Packet Size, so the
broker does not send them at all, and a spec is size-checked before it is parsed. Code too
big for a spec comes by reference (``code {url, sha256, size}``, agent.edge.fetch).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.contract import protocol
from agent.edge import fetch
from agent.errors import DeploymentRejected
from testing.agent_process import AgentProcess
from testing.cloud import Cloud
from testing.specs import source_spec

ECHO = "def handler(payload):\n    return {'echo': payload}\n"
MB = 1024 * 1024


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _publish_big(cloud: Cloud, topic: str, payload: bytes, *, retain: bool = False) -> None:
    info = cloud.client.publish(topic, payload, qos=1, retain=retain)
    info.wait_for_publish(120)
    assert info.is_published(), f"the broker did not take the {len(payload)}-byte message"


def _big_spec(size: int) -> bytes:
    head = b'{"id": "big", "name": "big", "version": "1", "entrypoint": "m:handler", '
    tail = b'", "sha256": "' + b"0" * 64 + b'"}, "memory_mb": 64, "timeout_seconds": 5}'
    filler = size - len(head) - len(tail) - len(b'"code": {"format": "source", "data": "')
    return head + b'"code": {"format": "source", "data": "' + b"x" * filler + tail


def _ready_agent(agent_factory: Callable[..., AgentProcess], cloud: Cloud) -> AgentProcess:
    agent = agent_factory(agent={"log_level": "info"}).start()
    cloud.wait_message("edge/nodes/gw-test/status", lambda m: m["status"] == "online", 20)
    cloud.deploy(None, source_spec("echo", ECHO))
    cloud.wait_message(
        "edge/nodes/gw-test/functions/echo/state", lambda m: m["state"] == "active", 30
    )
    assert cloud.invoke("gw-test", "echo", 1, timeout=20)["ok"]
    return agent


def test_refused_200mb_spec_and_invoke_leave_the_agent_rss_flat(
    agent_factory: Callable[..., AgentProcess], cloud: Cloud
) -> None:
    """A 200 MB spec took the agent to 1.8 GB, a 200 MB invoke to 647 MB, to refuse them."""
    agent = _ready_agent(agent_factory, cloud)
    assert agent.proc is not None
    pid = agent.proc.pid
    idle_kb = _status_kb(pid, "VmRSS")
    _publish_big(cloud, "edge/fleet/functions/big", _big_spec(200 * MB), retain=True)
    body = json.dumps({"request_id": "huge", "function_id": "echo", "payload": ""}).encode()
    _publish_big(cloud, "edge/nodes/gw-test/invoke", body[:-2] + b"x" * (200 * MB) + b'"}')
    # Both were published before this one, on the same session: once it is answered, the
    # broker has dealt with them (dropped them for the agent: over its Maximum Packet Size).
    assert cloud.invoke("gw-test", "echo", "after", timeout=60)["ok"]
    agent_rss = _status_kb(pid, "VmHWM")
    print(
        f"\nagent idle RSS {idle_kb / 1024:.1f} MiB, peak (VmHWM) after a 200 MB spec "
        f"and a 200 MB invoke {agent_rss / 1024:.1f} MiB"
    )
    assert agent_rss < 2 * idle_kb, f"peak {agent_rss} kB, idle {idle_kb} kB"
    assert not cloud.on("edge/nodes/gw-test/functions/big/state")
    assert "huge" not in agent.log()


def test_spec_over_max_spec_bytes_is_rejected_before_parsing(
    agent_factory: Callable[..., AgentProcess], cloud: Cloud
) -> None:
    """A spec was parsed whatever its size: the first 100 MB of JSON cost 861 MB of RSS."""
    _ready_agent(agent_factory, cloud)
    cloud.publish("edge/fleet/functions/big", _big_spec(MB + 64 * 1024), retain=True)
    state = cloud.wait_message(
        "edge/nodes/gw-test/functions/big/state", lambda m: m["state"] == "rejected", 30
    )
    assert state["error"]["type"] == "deployment_rejected", state
    assert "agent.max_spec_bytes (1048576)" in state["error"]["message"], state
    assert "by reference" in state["error"]["message"], state


# -- code by reference: agent.edge.fetch ----------------------------------------------------------


CODE = b"def handler(payload):\n    return payload\n" * 1000


class _CodeServer:
    """HTTPS on a free loopback port with a self-signed certificate for 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        self.cert, self.key = workdir / "cert.pem", workdir / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        self.sent = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/code":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(CODE)))
                    self.end_headers()
                    self.wfile.write(CODE)
                elif self.path == "/endless":  # no length: a body that never ends
                    self.send_response(200)
                    self.end_headers()
                    chunk = b"x" * 65536
                    try:
                        while server.sent < 1024 * MB:
                            self.wfile.write(chunk)
                            server.sent += len(chunk)
                    except OSError:
                        pass
                elif self.path == "/to-http":
                    self.send_response(302)
                    self.send_header("Location", "http://127.0.0.1:9/code")
                    self.end_headers()
                else:
                    self.send_response(404 if self.path == "/missing" else 503)
                    self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"


@pytest.fixture
def code_server(tmp_path: Path) -> Iterator[_CodeServer]:
    server = _CodeServer(tmp_path)
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def _ref(url: str, data: bytes = CODE, size: int | None = None) -> fetch.CodeRef:
    return fetch.CodeRef(url, hashlib.sha256(data).hexdigest(), len(data) if size is None else size)


def test_code_by_reference_is_fetched_to_disk_and_checked(
    code_server: _CodeServer, tmp_path: Path
) -> None:
    """Code too big for a spec had no way in: a spec carried every byte of it."""
    dest = tmp_path / "fetched"
    path = fetch.fetch_code(
        _ref(code_server.url("/code")), dest, max_bytes=MB, ca_file=str(code_server.cert)
    )
    assert path.read_bytes() == CODE and path.name == hashlib.sha256(CODE).hexdigest()
    source = tmp_path / "code.py"
    source.write_bytes(CODE)
    again = fetch.fetch_code(_ref(source.as_uri()), dest, max_bytes=MB, allow_file=True)
    assert again == path and sorted(p.name for p in dest.iterdir()) == [path.name]


def test_fetch_stops_at_the_first_byte_past_the_declared_size(
    code_server: _CodeServer, tmp_path: Path
) -> None:
    """A reference's body was read whatever its length (a 1 GB answer to a 1 MB size)."""
    with pytest.raises(DeploymentRejected, match=r"more than code.size \(1048576\)"):
        fetch.fetch_code(
            _ref(code_server.url("/endless"), size=MB),
            tmp_path / "fetched",
            max_bytes=2 * MB,
            ca_file=str(code_server.cert),
        )
    assert code_server.sent < 64 * MB, f"the server got to send {code_server.sent} bytes"
    assert list((tmp_path / "fetched").iterdir()) == [], "a partial file was left behind"


def test_fetch_refuses_bad_references_without_keeping_anything(
    code_server: _CodeServer, tmp_path: Path
) -> None:
    """A digest mismatch, a redirect to http or a missing file must reject, not install."""
    dest = tmp_path / "fetched"
    ca = str(code_server.cert)
    cases = [
        (_ref(code_server.url("/code"), data=b"other"), "announces|code.size"),
        (fetch.CodeRef(code_server.url("/code"), "0" * 64, len(CODE)), "SHA-256"),
        (_ref(code_server.url("/to-http")), "not https"),
        (_ref(code_server.url("/missing")), "HTTP 404"),
        (_ref(f"http://127.0.0.1:{code_server.port}/code"), "scheme 'http' not allowed"),
        (_ref((tmp_path / "x.py").as_uri()), "scheme 'file' not allowed"),
        (_ref(code_server.url("/code"), size=2 * MB), r"code.size: 2097152 bytes"),
    ]
    for ref, message in cases:
        with pytest.raises(DeploymentRejected, match=message):
            fetch.fetch_code(ref, dest, max_bytes=MB, ca_file=ca)
    with pytest.raises(fetch.FetchFailed, match="HTTP 503"):  # transient: may work later
        fetch.fetch_code(_ref(code_server.url("/busy")), dest, max_bytes=MB, ca_file=ca)
    with pytest.raises(fetch.FetchFailed, match="CERTIFICATE_VERIFY_FAILED"):
        fetch.fetch_code(_ref(code_server.url("/code")), dest, max_bytes=MB)  # no private CA
    assert list(dest.iterdir()) == []


def test_spec_with_code_by_reference_round_trips() -> None:
    """code {url, sha256, size} was refused: data was required."""
    spec = source_spec("big", "")
    spec["code"] = {"format": "zip", "url": "https://cdn.example/f.zip", "sha256": "a" * 64,
                    "size": 10 * MB}  # fmt: skip
    decoded = protocol.decode_spec(json.dumps(spec).encode())
    assert (decoded.code.url, decoded.code.size) == ("https://cdn.example/f.zip", 10 * MB)
    assert protocol.decode_spec(protocol.encode_spec(decoded)) == decoded
    with pytest.raises(DeploymentRejected, match="must be fetched"):
        protocol.code_bytes(decoded.code)
    spec["code"]["data"] = "x"
    with pytest.raises(DeploymentRejected, match="not allowed next to url"):
        protocol.decode_spec(json.dumps(spec).encode())
