"""The whole loop once: broker, agent process, deploy over MQTT, invoke over MQTT."""

from __future__ import annotations

from testing.agent_process import AgentProcess
from testing.cloud import Cloud
from testing.specs import source_spec

SENSOR = (
    "def handler(event):\n"
    "    return {'processed': True, 'value': event['temperature'] * 1.8 + 32}\n"
)


def test_deploy_and_invoke_over_mqtt(cloud: Cloud, agent_factory) -> None:  # type: ignore[no-untyped-def]
    """A function deployed on the fleet topic answers an invocation on the node's topic."""
    agent: AgentProcess = agent_factory().start()
    cloud.wait_message("edge/nodes/gw-test/status", lambda m: m["status"] == "online")
    cloud.deploy(None, source_spec("sensor", SENSOR))
    cloud.wait_message(
        "edge/nodes/gw-test/functions/sensor/state", lambda m: m["state"] == "active"
    )
    reply = cloud.invoke("gw-test", "sensor", {"temperature": 25})
    assert reply["ok"] is True, reply
    assert reply["result"] == {"processed": True, "value": 77.0}
    agent.stop()
