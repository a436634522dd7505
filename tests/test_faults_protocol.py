"""Protocol faults against a real 3.1.1-only broker (Debian's nats-server, MQTT listener).

Before issue 12: with the default MQTT 5 the agent retried forever against such a broker and
said nothing at INFO, and edgectl reported "Unspecified error".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from conftest import TcpProxy, cli_status, run_cli

from agent.cloud import ctl
from testing.agent_process import AgentProcess
from testing.broker import NatsServer
from testing.cloud import Cloud
from testing.specs import source_spec

ECHO = "def handler(payload):\n    return {'echo': payload}\n"


@pytest.fixture
def nats_agents(tmp_path: Path, nats: NatsServer) -> Iterator[Callable[..., AgentProcess]]:
    agents: list[AgentProcess] = []

    def make(**sections: object) -> AgentProcess:
        agent = AgentProcess(tmp_path, nats.port, "gw-test", **sections)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.stop()


def test_protocol_auto_falls_back_to_311_on_a_311_only_broker(
    nats: NatsServer, nats_agents: Callable[..., AgentProcess]
) -> None:
    """The default MQTT 5 never connected to a 3.1.1-only broker, silently at INFO."""
    agent = nats_agents(agent={"log_level": "info"}).start()  # protocol: the default, auto
    cloud = Cloud(nats.port, protocol=paho.MQTTv311)
    try:
        agent.wait_log("using MQTT 3.1.1 from now on", timeout=20)
        log = agent.log()
        assert "does not accept MQTT 5" in log, log[-2000:]
        refusal = [ln for ln in log.splitlines() if "does not accept MQTT 5" in ln]
        assert any("WARNING" in ln for ln in refusal), log[-2000:]
        agent.wait_log("connected to 127.0.0.1", timeout=20)
        cloud.wait_message(
            "edge/nodes/gw-test/status", lambda m: m["status"] == "online", timeout=20
        )
        cloud.deploy(None, source_spec("echo", ECHO))
        cloud.wait_message(
            "edge/nodes/gw-test/functions/echo/state",
            lambda m: m["state"] == "active",
            timeout=30,
        )
        reply = cloud.invoke("gw-test", "echo", {"n": 1}, timeout=20)
        assert reply["ok"] and reply["result"] == {"echo": {"n": 1}}, reply
    finally:
        cloud.close()


def test_protocol_5_against_a_311_only_broker_names_the_refusal(
    nats: NatsServer, nats_agents: Callable[..., AgentProcess]
) -> None:
    """An explicit MQTT 5 against a 3.1.1-only broker retried forever with nothing at INFO."""
    agent = nats_agents(mqtt={"protocol": "5"}, agent={"log_level": "info"}).start()
    agent.wait_log("does not accept MQTT 5", timeout=20)
    line = next(ln for ln in agent.log().splitlines() if "does not accept MQTT 5" in ln)
    assert "WARNING" in line and "Unsupported protocol version" in line, line
    assert "using MQTT 3.1.1" not in agent.log()  # an explicit version is kept
    assert agent.proc is not None and agent.proc.poll() is None, "the agent must keep trying"


def test_edgectl_names_the_protocol_refusal(
    nats: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """edgectl against a 3.1.1-only broker said "Unspecified error"."""
    broker = f"127.0.0.1:{nats.port}"
    code = ctl.main(["--broker", broker, "--connect-timeout", "3", "nodes"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "does not accept MQTT 5" in err and "Unsupported protocol version" in err, err
    assert "--protocol 3.1.1" in err and "Unspecified error" not in err, err
    code = ctl.main(["--broker", broker, "--protocol", "3.1.1", "nodes", "--json"])
    assert code == 0, capsys.readouterr().err


def test_check_config_refuses_a_dotted_prefix_with_portable_topics(tmp_path: Path) -> None:
    """topic_prefix "acme.edge" passed check-config, then never worked on NATS."""
    config = tmp_path / "agent.toml"
    config.write_text(
        '[node]\nid = "gw-1"\n[mqtt]\ntopic_prefix = "acme.edge"\ntopic_charset = "portable"\n'
        f'[agent]\nstate_dir = "{tmp_path}"\n'
    )
    done = run_cli("check-config", "--config", str(config))
    assert done.returncode != 0, done.stdout
    assert "mqtt.topic_prefix" in done.stderr and "portable" in done.stderr, done.stderr
    config.write_text(config.read_text().replace("acme.edge", "acme/edge"))
    done = run_cli("check-config", "--config", str(config))
    assert done.returncode == 0, done.stderr
    config.write_text(config.read_text().replace("[agent]", 'reply_prefixes = ["r.x/"]\n[agent]'))
    done = run_cli("check-config", "--config", str(config))
    assert done.returncode != 0 and "mqtt.reply_prefixes[0]" in done.stderr, done.stderr


def _invoke_msg(rid: str, **extra: object) -> dict[str, object]:
    return {"request_id": rid, "function_id": "echo", "payload": rid, **extra}


def _deployed_on_nats(nats: NatsServer, agent: AgentProcess) -> Cloud:
    cloud = Cloud(nats.port, protocol=paho.MQTTv311)
    cloud.wait_message("edge/nodes/gw-test/status", lambda m: m["status"] == "online", 30)
    cloud.deploy(None, source_spec("echo", ECHO))
    cloud.wait_message(
        "edge/nodes/gw-test/functions/echo/state", lambda m: m["state"] == "active", 30
    )
    return cloud


def test_poison_reply_is_dead_lettered_and_the_rest_drains(
    nats: NatsServer, nats_agents: Callable[..., AgentProcess]
) -> None:
    """A reply NATS closes the connection over headed the outbox: 65 disconnects in 22 s."""
    agent = nats_agents().start()
    cloud = _deployed_on_nats(nats, agent)
    try:
        invoke = "edge/nodes/gw-test/invoke"
        cloud.publish(invoke, _invoke_msg("poison", reply_to="replies/a.b"))
        for i in range(5):
            cloud.publish(invoke, _invoke_msg(f"after-{i}"))
        for i in range(5):
            cloud.wait_message(
                "edge/nodes/gw-test/replies",
                lambda m, i=i: m.get("request_id") == f"after-{i}",
                timeout=60,
            )
        dead = cli_status(agent)["dead_letters"]
        assert dead["count"] == 1, dead
        newest = dead["newest"][0]
        assert newest["topic"] == "replies/a.b", newest
        assert "the broker closed the connection after it, 3 times" in newest["reason"], newest
        drops = agent.log().count("lost the broker")
        assert drops <= 4, f"{drops} disconnects for one poison message:\n{agent.log()[-3000:]}"
        # A restart does not bring it back: it stays set aside, the link stays up.
        agent.stop()
        agent.start()
        cloud.wait_message(
            "edge/nodes/gw-test/status",
            lambda m: m["status"] == "degraded" and m.get("dead_letters") == 1,
            timeout=30,
        )
        reply = cloud.invoke("gw-test", "echo", "later", timeout=30)
        assert reply["ok"], reply
        assert agent.log().count("lost the broker") == drops, agent.log()[-3000:]
    finally:
        cloud.close()


def test_portable_charset_answers_bad_request_to_a_dotted_reply_address(
    nats: NatsServer, nats_agents: Callable[..., AgentProcess]
) -> None:
    """With topics mapped to subjects a reply_to with "." cost the connection, not a refusal."""
    agent = nats_agents(mqtt={"topic_charset": "portable"}).start()
    cloud = _deployed_on_nats(nats, agent)
    try:
        cloud.publish("edge/nodes/gw-test/invoke", _invoke_msg("dotted", reply_to="r/a.b"))
        reply = cloud.wait_message(
            "edge/nodes/gw-test/replies", lambda m: m.get("request_id") == "dotted", 30
        )
        assert not reply["ok"] and reply["error"]["type"] == "bad_request", reply
        assert "portable" in reply["error"]["message"], reply
        assert "lost the broker" not in agent.log(), agent.log()[-3000:]
        assert cli_status(agent)["dead_letters"]["count"] == 0
    finally:
        cloud.close()


def _mqtt5_connect(data: bytes) -> bool:
    """A CONNECT packet of protocol level 5 (what RabbitMQ 3.10 closes the socket on)."""
    return data[:1] == b"\x10" and b"\x00\x04MQTT\x05" in data[:16]


def test_protocol_auto_falls_back_when_the_broker_closes_during_connect(
    agent_factory: Callable[..., AgentProcess], cloud: Cloud, uplink: TcpProxy
) -> None:
    """A broker that closes the socket on an MQTT 5 CONNECT was retried forever, silently."""
    uplink.close_if = _mqtt5_connect
    agent = agent_factory(port=uplink.port, agent={"log_level": "info"}).start()
    agent.wait_log("using MQTT 3.1.1 from now on", timeout=20)
    cloud.wait_message("edge/nodes/gw-test/status", lambda m: m["status"] == "online", 20)
    assert uplink.closed_by_rule == 2, uplink.closed_by_rule
    log = agent.log()
    line = next(ln for ln in log.splitlines() if "2 times in a row" in ln)
    assert "WARNING" in line and "does not accept MQTT 5" in line, line
    cloud.deploy(None, source_spec("echo", ECHO))
    cloud.wait_message(
        "edge/nodes/gw-test/functions/echo/state", lambda m: m["state"] == "active", 30
    )
    assert cloud.invoke("gw-test", "echo", 7, timeout=20)["ok"]


def test_protocol_auto_goes_back_to_5_when_311_is_closed_on_too(
    agent_factory: Callable[..., AgentProcess], cloud: Cloud, uplink: TcpProxy
) -> None:
    """Closes that are not about the version (a proxy whose broker is down) pinned 3.1.1."""
    uplink.close_if = lambda data: data[:1] == b"\x10"  # every CONNECT, whatever its version
    agent = agent_factory(port=uplink.port, agent={"log_level": "info"}).start()
    agent.wait_log("back to MQTT 5", timeout=30)
    uplink.close_if = None
    agent.wait_log("with MQTT 5\n", timeout=30)
    cloud.wait_message("edge/nodes/gw-test/status", lambda m: m["status"] == "online", 20)
    log = agent.log()
    assert log.index("using MQTT 3.1.1") < log.index("back to MQTT 5"), log[-3000:]


def test_dotted_prefix_on_nats_is_named_in_the_log(
    nats: NatsServer, nats_agents: Callable[..., AgentProcess]
) -> None:
    """topic_prefix "acme.edge" never connected to NATS, silently at INFO."""
    agent = nats_agents(mqtt={"topic_prefix": "acme.edge"}, agent={"log_level": "info"})
    agent.start()
    agent.wait_log("mqtt.topic_charset", timeout=20)
    line = next(ln for ln in agent.log().splitlines() if "mqtt.topic_charset" in ln)
    assert "WARNING" in line and "'acme.edge/nodes/gw-test/status'" in line, line
