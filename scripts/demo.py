"""The whole loop on one machine: a private broker, the agent, a deployment, an invocation.

Run it with ``scripts/demo``. Everything lives in a temporary directory and on a free
loopback port; nothing is left running afterwards. The broker, the agent process and the
cloud client are the harness's (``testing/``), the same ones the tests use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.contract import protocol
from agent.trust import Signer, generate_keypair
from testing.agent_process import REPO, AgentProcess
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.outcomes import Unavailable, WaitTimeout

NODE = "gw-demo"


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def main() -> int:
    try:
        return run()
    except Unavailable as exc:
        raise SystemExit(f"demo: {exc}; run scripts/bootstrap") from None
    except WaitTimeout as exc:
        raise SystemExit(f"demo: {exc}") from None


def run() -> int:
    work = Path(tempfile.mkdtemp(prefix="edge-demo-"))
    broker = Mosquitto(work)
    agent: AgentProcess | None = None
    cloud: Cloud | None = None
    try:
        say(f"starting a private Mosquitto on 127.0.0.1:{broker.port}")
        broker.start()
        cloud = Cloud(broker.port, topics=["demo/replies"])
        recorder = cloud

        def wait(topic: str, check: Any = lambda m: True) -> dict[str, Any]:
            # 1 ms polls: the round trips printed below are the agent's, not the poll's.
            return recorder.wait_message(topic, check, timeout=15, poll=0.001)

        # A throw-away signing key: the agent accepts only specs signed by it. The agent
        # refuses a key file its own uid could rewrite, which only holds when it runs as
        # root here (the key is root's); otherwise the demo runs unsigned and says so.
        signer, sections = None, {}
        if os.geteuid() == 0:
            (work / "trust").mkdir(mode=0o755)
            key_id = generate_keypair(work / "trust" / "demo")
            signer = Signer.from_file(work / "trust" / "demo")
            sections["trust"] = {"keys": [str(work / "trust" / "demo.pub")]}
            say(f"made a throw-away signing key {key_id}; the agent will trust only it")
        else:
            say("not root: the agent runs without [trust] keys (unsigned mode)")
        # A uid per function needs a state directory and an interpreter that function users
        # can reach: this venv's python may live under /root, so workers use Debian's.
        if os.geteuid() == 0 and os.path.exists("/usr/bin/python3"):
            work.chmod(0o711)
            sections["runtime"] = {"worker_python": "/usr/bin/python3"}
            say("functions will run under uids of their own (runtime.function_uids)")

        say("starting the agent (edge-agent run)")
        base = {
            "node": {
                "id": NODE,
                "name": "Demo gateway",
                "location": "your desk",
                "capabilities": ["python"],
            },
            "mqtt": {"port": broker.port},
            "agent": {"state_dir": str(work / "state"), "heartbeat_interval_s": 2},
        }
        agent = AgentProcess(work, broker.port, NODE, base=base, **sections).start()
        status = wait(f"edge/nodes/{NODE}/status", lambda m: m["status"] == "online")
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
        state = wait(f"edge/nodes/{NODE}/functions/sensor/state", lambda m: m["state"] == "active")
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
            reply = wait("demo/replies", lambda m, r=request_id: m["request_id"] == r)
            elapsed = (time.perf_counter() - started) * 1000
            print(f"    reply:  {json.dumps(reply)}")
            print(f"    round trip {elapsed:.1f} ms, cold start: {reply['cold_start']}")

        heartbeat = wait(
            f"edge/nodes/{NODE}/heartbeat",
            lambda m: any(f["invocations"] >= 2 for f in m["functions"]),
        )
        say("a heartbeat")
        print(f"    {json.dumps(heartbeat)[:400]}...")

        say("stopping the agent with SIGTERM (graceful: status goes offline)")
        agent.signal(signal.SIGTERM)
        code = agent.wait_exit(30)
        offline = wait(f"edge/nodes/{NODE}/status", lambda m: m["status"] == "offline")
        print(f"    exit code {code}; status: {offline['status']}")
        say("done: the demo worked end to end")
        return 0
    finally:
        if cloud is not None:
            cloud.close()
        if agent is not None:
            agent.stop()
        broker.stop()
        if os.environ.get("EDGE_DEMO_KEEP"):
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
