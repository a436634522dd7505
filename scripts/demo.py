"""The whole loop on one machine: a private broker, the agent, a deployment, an invocation.

Run it with ``scripts/demo``. Everything lives in a temporary directory and on a free
loopback port; nothing is left running afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.contract import protocol
from agent.trust import Signer, generate_keypair

REPO = Path(__file__).resolve().parent.parent
NODE = "gw-demo"


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"demo: the broker did not listen on port {port}")


class Cloud:
    """A tiny stand-in for the cloud side: records messages, waits for the ones it wants."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, dict[str, Any], Any]] = []
        self.cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        # paho leaves Nagle on: a QoS 1 round trip would wait ~40 ms for delayed ACKs.
        self.client.on_socket_open = lambda c, u, s: s.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([("edge/#", 1), ("demo/replies", 1)])

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        if not msg.payload:
            return
        with self.cond:
            self.messages.append((msg.topic, json.loads(msg.payload), msg.properties))
            self.cond.notify_all()

    def wait(self, topic: str, check: Any = lambda m: True, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, m, _ in self.messages:
                    if t == topic and check(m):
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SystemExit(f"demo: nothing arrived on {topic} within {timeout}s")
                self.cond.wait(remaining)

    def publish(self, topic: str, body: Any, retain: bool = False, props: Any = None) -> None:
        self.client.publish(topic, json.dumps(body), qos=1, retain=retain, properties=props)


def main() -> int:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(mosquitto):
        raise SystemExit("demo: mosquitto is not installed; run scripts/bootstrap")
    work = Path(tempfile.mkdtemp(prefix="edge-demo-"))
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        say(f"starting a private Mosquitto on 127.0.0.1:{port}")
        (work / "mosquitto.conf").write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\n"
            "set_tcp_nodelay true\nmax_queued_messages 100000\n"
        )
        procs.append(
            subprocess.Popen(
                [mosquitto, "-c", str(work / "mosquitto.conf")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_port(port, 10)
        cloud = Cloud(port)

        # A throw-away signing key: the agent accepts only specs signed by it. The agent
        # refuses a key file its own uid could rewrite, which only holds when it runs as
        # root here (the key is root's); otherwise the demo runs unsigned and says so.
        signer, trust = None, ""
        if os.geteuid() == 0:
            (work / "trust").mkdir(mode=0o755)
            key_id = generate_keypair(work / "trust" / "demo")
            signer = Signer.from_file(work / "trust" / "demo")
            trust = f'\n[trust]\nkeys = ["{work / "trust" / "demo.pub"}"]\n'
            say(f"made a throw-away signing key {key_id}; the agent will trust only it")
        else:
            say("not root: the agent runs without [trust] keys (unsigned mode)")
        # A uid per function needs a state directory and an interpreter that function users
        # can reach: this venv's python may live under /root, so workers use Debian's.
        runtime = ""
        if os.geteuid() == 0 and os.path.exists("/usr/bin/python3"):
            work.chmod(0o711)
            runtime = '\n[runtime]\nworker_python = "/usr/bin/python3"\n'
            say("functions will run under uids of their own (runtime.function_uids)")

        say("starting the agent (edge-agent run)")
        config = work / "agent.toml"
        config.write_text(
            f'[node]\nid = "{NODE}"\nname = "Demo gateway"\nlocation = "your desk"\n'
            f'capabilities = ["python"]\n\n[mqtt]\nport = {port}\n\n'
            f'[agent]\nstate_dir = "{work / "state"}"\nheartbeat_interval_s = 2\n{trust}'
            f"{runtime}"
        )
        log = (work / "agent.log").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        )
        status = cloud.wait(f"edge/nodes/{NODE}/status", lambda m: m["status"] == "online")
        print(f"    status: {json.dumps(status)}")

        say("deploying examples/sensor/sensor.py to the fleet (retained spec)")
        source = (REPO / "examples/sensor/sensor.py").read_text()
        spec = {
            "id": "sensor",
            "name": "Sensor converter",
            "version": "1.0.0",
            "entrypoint": "sensor:handler",
            "code": {
                "format": "source",
                "data": source,
                "sha256": hashlib.sha256(source.encode()).hexdigest(),
            },
            "memory_mb": 64,
            "timeout_seconds": 5,
        }
        if signer is not None:  # signed for the whole fleet, sequence = the ms clock
            decoded = protocol.decode_spec(json.dumps(spec).encode())
            signed = signer.sign(decoded, target="fleet", sequence=int(time.time() * 1000))
            spec = json.loads(protocol.encode_spec(signed))
            print(f"    signed by {signer.key_id} for the fleet, sequence {signed.sequence}")
        cloud.publish("edge/fleet/functions/sensor", spec, retain=True)
        state = cloud.wait(
            f"edge/nodes/{NODE}/functions/sensor/state", lambda m: m["state"] == "active"
        )
        print(f"    state:  {json.dumps(state)}")

        for attempt in (1, 2):
            say(f"invoking sensor over MQTT 5 request/response (call {attempt})")
            request_id = uuid.uuid4().hex
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = "demo/replies"
            props.CorrelationData = request_id.encode()
            started = time.perf_counter()
            cloud.publish(
                f"edge/nodes/{NODE}/invoke",
                {"request_id": request_id, "function_id": "sensor", "payload": {"temperature": 25}},
                props=props,
            )
            reply = cloud.wait("demo/replies", lambda m, r=request_id: m["request_id"] == r)
            elapsed = (time.perf_counter() - started) * 1000
            print(f"    reply:  {json.dumps(reply)}")
            print(f"    round trip {elapsed:.1f} ms, cold start: {reply['cold_start']}")

        heartbeat = cloud.wait(
            f"edge/nodes/{NODE}/heartbeat",
            lambda m: any(f["invocations"] >= 2 for f in m["functions"]),
        )
        say("a heartbeat")
        print(f"    {json.dumps(heartbeat)[:400]}...")

        say("stopping the agent with SIGTERM (graceful: status goes offline)")
        procs[1].send_signal(signal.SIGTERM)
        code = procs[1].wait(30)
        offline = cloud.wait(f"edge/nodes/{NODE}/status", lambda m: m["status"] == "offline")
        print(f"    exit code {code}; status: {offline['status']}")
        cloud.client.loop_stop()
        say("done: the demo worked end to end")
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if os.environ.get("EDGE_DEMO_KEEP"):
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
