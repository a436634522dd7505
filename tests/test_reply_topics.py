"""Reply addresses stay out of the wire contract (issue 10, item 3).

A request's ``reply_to`` or MQTT 5 Response Topic once made the agent publish its reply onto
``<p>/fleet/functions/<fid>`` or onto another node's spec, invoke, status or desired topic:
every gateway then read the reply as a spec and reported the function ``rejected``. Now such
a request is answered ``bad_request`` on ``<p>/nodes/<node>/replies``, its handler does not
run, and nothing reaches the target. The rule itself is ``protocol.reply_address_problem``.

Proving that nothing reached a target without sleeping: after the error reply arrives, the
test publishes a marker onto the target from the subscriber's own connection and waits for
it. The agent decided (and queued whatever it was going to publish) before its reply, and the
broker delivers one publisher's messages in order; anything it had sent to the target would
have been routed before the reply, which the test saw before it sent the marker.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, load_config
from agent.contract import protocol
from agent.models import EdgeNodeStatus
from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import Cloud, connect, wait_status
from testing.specs import source_spec
from testing.wait import wait_for

NODE = "gw-rt"  # mqtt.reply_prefixes empty: the contract rule alone
LISTED = "gw-rtp"  # mqtt.reply_prefixes = ["app/replies/"]
OTHER = "gw-other"
REPLIES = f"edge/nodes/{NODE}/replies"

COUNTED = """\
import os


def handler(event):
    with open(os.path.join(os.environ['COUNT_DIR'], event), 'a') as log:
        log.write('ran\\n')
    return {'ran': event}
"""


class Served:
    def __init__(self, broker: Mosquitto, count_dir: Path) -> None:
        self.broker = broker
        self.count_dir = count_dir

    def ran(self, name: str) -> bool:
        return (self.count_dir / name).exists()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("replies")
    count_dir = workdir / "counts"
    count_dir.mkdir()
    broker = Mosquitto(workdir).start()
    agents = [
        AgentProcess(workdir, broker.port, NODE),
        AgentProcess(workdir, broker.port, LISTED, mqtt={"reply_prefixes": ["app/replies/"]}),
    ]
    for agent in agents:
        agent.start()
    cloud = Cloud(broker.port)
    try:
        spec = source_spec("counted", COUNTED, environment={"COUNT_DIR": str(count_dir)})
        for agent in agents:
            cloud.wait_message(
                f"edge/nodes/{agent.node_id}/status", lambda m: m["status"] == "online"
            )
            cloud.deploy(agent.node_id, spec)
        for agent in agents:
            cloud.wait_message(
                f"edge/nodes/{agent.node_id}/functions/counted/state",
                lambda m: m["state"] == "active",
            )
    finally:
        cloud.close()
    yield Served(broker, count_dir)
    for agent in agents:
        agent.stop()
    broker.stop()


class Watcher(Cloud):
    """The test cloud, also subscribed to a target topic (and below it) outside ``edge/#``."""

    def watch(self, topic: str) -> None:
        if topic.startswith("edge/"):
            return  # already recorded
        self._subscribed.clear()
        self.client.subscribe(f"{topic}/#", qos=1)  # the topic and its neighbours
        if not self._subscribed.wait(5):
            pytest.fail(f"could not subscribe to {topic}")

    def raw_on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]


@pytest.fixture
def cloud(served: Served) -> Iterator[Watcher]:
    c = Watcher(served.broker.port)
    yield c
    c.close()


def request(rid: str, reply_to: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": rid, "function_id": "counted", "payload": rid}
    if reply_to is not None:
        body["reply_to"] = reply_to
    return body


def assert_refused_and_nothing_published(
    cloud: Watcher, served: Served, rid: str, target: str, node: str = NODE
) -> dict[str, Any]:
    """The bad_request reply is on the node's default topic; the target got nothing."""
    reply = cloud.wait_message(f"edge/nodes/{node}/replies", lambda m: m["request_id"] == rid)
    assert reply["ok"] is False and reply["error"]["type"] == "bad_request", reply
    assert "reply address refused" in reply["error"]["message"], reply
    assert reply["function_id"] == "counted"
    # The neighbour, not the target itself: a marker on a spec topic would be a spec.
    neighbour = f"{target}/marker"
    marker = json.dumps({"marker": rid}).encode()
    cloud.client.publish(neighbour, marker, qos=1).wait_for_publish(5)
    wait_for(
        lambda: marker in cloud.raw_on(neighbour),
        10,
        f"the marker published to {neighbour} after the reply never came back",
    )
    # The only thing on an invoke target is the request itself; a reply always has "ok".
    replies = [p for p in cloud.raw_on(target) if "ok" in json.loads(p)]
    assert replies == [], f"the agent published onto {target}: {replies}"
    assert not served.ran(rid), f"the handler ran for refused request {rid}"
    return reply


CONTRACT_TARGETS = {
    "fleet_spec": "edge/fleet/functions/counted",
    "other_node_spec": f"edge/nodes/{OTHER}/functions/counted",
    "other_node_invoke": f"edge/nodes/{OTHER}/invoke",
    "other_node_status": f"edge/nodes/{OTHER}/status",
    "other_node_sync_desired": f"edge/nodes/{OTHER}/sync/desired",
    "own_invoke_loop": f"edge/nodes/{NODE}/invoke",
    "own_spec": f"edge/nodes/{NODE}/functions/counted",
    "controller_fence": "edge/controllers/ctl-0123456789ab/fence",
}


@pytest.mark.parametrize("target", list(CONTRACT_TARGETS.values()), ids=list(CONTRACT_TARGETS))
def test_reply_to_onto_a_contract_topic_is_refused(
    cloud: Watcher, served: Served, target: str
) -> None:
    """Attack: reply_to names a spec/invoke/status/desired topic; the agent once published there."""
    cloud.watch(target)
    rid = uuid.uuid4().hex
    cloud.publish(f"edge/nodes/{NODE}/invoke", request(rid, target))
    reply = assert_refused_and_nothing_published(cloud, served, rid, target)
    assert "belongs to the wire contract" in reply["error"]["message"], reply


def test_half_valid_request_with_contract_reply_to_is_answered_on_the_default_topic(
    cloud: Watcher, served: Served
) -> None:
    """Attack: a request that fails to decode (no payload) still names a spec topic as
    reply_to; its bad_request must not go there either."""
    target = "edge/fleet/functions/counted"
    rid = uuid.uuid4().hex
    body = {"request_id": rid, "function_id": "counted", "reply_to": target}
    cloud.publish(f"edge/nodes/{NODE}/invoke", body)
    reply = cloud.wait_message(REPLIES, lambda m: m["request_id"] == rid)
    assert reply["error"]["type"] == "bad_request" and "payload" in reply["error"]["message"]
    neighbour = f"{target}/marker"
    cloud.client.publish(neighbour, b"{}", qos=1).wait_for_publish(5)
    wait_for(lambda: cloud.raw_on(neighbour), 10, f"the marker on {neighbour} never came back")
    assert cloud.raw_on(target) == [], f"the agent published onto {target}"


def test_reply_to_onto_sys_topic_is_refused(cloud: Watcher, served: Served) -> None:
    """Attack: reply_to is a $SYS topic (the broker's own namespace)."""
    rid = uuid.uuid4().hex
    cloud.publish(f"edge/nodes/{NODE}/invoke", request(rid, "$SYS/broker/clients/total"))
    reply = cloud.wait_message(REPLIES, lambda m: m["request_id"] == rid)
    assert reply["error"]["type"] == "bad_request" and "reply_to" in reply["error"]["message"]
    assert not served.ran(rid)


def test_reply_to_with_wildcard_is_refused(cloud: Watcher, served: Served) -> None:
    """Attack: reply_to carries a wildcard (a publish there is a protocol error)."""
    rid = uuid.uuid4().hex
    cloud.publish(f"edge/nodes/{NODE}/invoke", request(rid, "edge/fleet/functions/+"))
    reply = cloud.wait_message(REPLIES, lambda m: m["request_id"] == rid)
    assert reply["error"]["type"] == "bad_request" and "reply_to" in reply["error"]["message"]
    assert not served.ran(rid)


def test_response_topic_onto_fleet_spec_is_refused(cloud: Watcher, served: Served) -> None:
    """Attack: the MQTT 5 Response Topic names the fleet spec topic; the Correlation Data
    still comes back with the refusal on the default topic."""
    target = "edge/fleet/functions/counted"
    rid = uuid.uuid4().hex
    correlation = b"corr-" + rid.encode()
    cloud.invoke_v5(NODE, json.dumps(request(rid)).encode(), target, correlation)
    reply = assert_refused_and_nothing_published(cloud, served, rid, target)
    assert "Response Topic" in reply["error"]["message"], reply
    [props] = [
        props
        for t, p, props in list(cloud.messages)
        if t == REPLIES and json.loads(p).get("request_id") == rid
    ]
    assert props.CorrelationData == correlation


def test_good_response_topic_with_bad_reply_to_is_refused(cloud: Watcher, served: Served) -> None:
    """Attack: a usable Response Topic must not launder a reply_to onto a spec topic."""
    target = "edge/fleet/functions/counted"
    rid = uuid.uuid4().hex
    body = json.dumps(request(rid, target)).encode()
    cloud.invoke_v5(NODE, body, f"edge/cloud/v5/{rid}", b"c")
    assert_refused_and_nothing_published(cloud, served, rid, target)


def test_allowed_reply_topics_still_work(cloud: Watcher, served: Served) -> None:
    """The default topic and a topic outside the contract still get the handler's result."""
    rid = uuid.uuid4().hex
    reply = cloud.invoke(NODE, "counted", rid)
    assert reply["ok"] is True and reply["result"] == {"ran": rid}
    rid = uuid.uuid4().hex
    reply = cloud.invoke(NODE, "counted", rid, reply_to=f"edge/cloud/answers/{rid}")
    assert reply["ok"] is True and served.ran(rid)


def test_reply_prefixes_limit_replies_to_the_listed_prefixes(
    cloud: Watcher, served: Served
) -> None:
    """With mqtt.reply_prefixes set, only the listed prefixes and the contract's reply topics
    are reply addresses: anything else is refused."""
    listed = f"app/replies/{uuid.uuid4().hex}"
    cloud.watch(listed)
    rid = uuid.uuid4().hex
    cloud.publish(f"edge/nodes/{LISTED}/invoke", request(rid, listed))
    wait_for(lambda: cloud.raw_on(listed), 10, f"no reply on the listed prefix {listed}")
    assert json.loads(cloud.raw_on(listed)[0])["result"] == {"ran": rid}
    unlisted = f"edge/cloud/answers/{uuid.uuid4().hex}"
    rid = uuid.uuid4().hex
    cloud.publish(f"edge/nodes/{LISTED}/invoke", request(rid, unlisted))
    reply = assert_refused_and_nothing_published(cloud, served, rid, unlisted, node=LISTED)
    assert "outside mqtt.reply_prefixes" in reply["error"]["message"]


def test_controller_reply_topic_still_works(served: Served) -> None:
    """A fleet controller's invoke (Response Topic and reply_to on
    <p>/controllers/<id>/replies) still gets its reply, also with reply_prefixes set."""
    cluster = connect(served.broker.port, heartbeat_interval_s=1.0)
    try:
        for node in (NODE, LISTED):
            wait_status(cluster, node, EdgeNodeStatus.ONLINE, 20)
            runtime = cluster.get_runtime(node)
            assert runtime is not None
            rid = f"ctl-{uuid.uuid4().hex}"
            assert runtime.invoke("counted", rid) == {"ran": rid}
    finally:
        cluster.close()


# -- the rule, without a broker --------------------------------------------------------------

T = protocol.Topics("acme/edge", "n1")


@pytest.mark.parametrize(
    "topic",
    [
        "acme/edge/nodes/n1/replies",
        "acme/edge/controllers/ctl-0123456789ab/replies",
        "acme/edge/cloud/answers",
        "acme/edgeX/nodes/n2/invoke",  # another prefix: not this contract
        "acme/edge/fleetwide",  # a sibling level, not fleet/
        "cloud/replies/controller-1",
    ],
)
def test_reply_addresses_allowed(topic: str) -> None:
    assert protocol.reply_address_problem(topic, prefix="acme/edge", node_id="n1") is None
    assert T.reply_address(None, topic) == protocol.ReplyAddress(topic, None)


@pytest.mark.parametrize(
    "topic",
    [
        "acme/edge/fleet",
        "acme/edge/fleet/functions/f",
        "acme/edge/nodes",
        "acme/edge/nodes/n1",
        "acme/edge/nodes/n1/invoke",
        "acme/edge/nodes/n1/replies/x",
        "acme/edge/nodes/n2/replies",
        "acme/edge/nodes/n2/sync/desired",
        "acme/edge/controllers",
        "acme/edge/controllers/c1/fence",
        "acme/edge/controllers/c.1/replies",
        "acme/edge/controllers/c1/replies/more",
        "$SYS/x",
        "a/+",
        "a/#",
        "",
    ],
)
def test_reply_addresses_refused(topic: str) -> None:
    problem = protocol.reply_address_problem(topic, prefix="acme/edge", node_id="n1")
    assert problem is not None
    address = T.reply_address(None, topic)
    assert address.topic == "acme/edge/nodes/n1/replies" and address.refused is not None


def test_reply_prefixes_are_an_allow_list() -> None:
    allowed = ("app/replies/",)
    assert T.reply_address(None, "app/replies/x", allowed).refused is None
    assert T.reply_address(None, "acme/edge/nodes/n1/replies", allowed).refused is None
    assert T.reply_address(None, "acme/edge/controllers/c1/replies", allowed).refused is None
    refused = T.reply_address(None, "app/other", allowed).refused
    assert refused is not None and "outside mqtt.reply_prefixes" in refused
    # A listed prefix never reopens the contract's namespaces.
    wide = ("acme/",)
    assert T.reply_address(None, "acme/edge/fleet/functions/f", wide).refused is not None


def test_either_address_refused_refuses_the_request() -> None:
    assert T.reply_address("ok/t", "acme/edge/fleet/functions/f").refused is not None
    assert T.reply_address("acme/edge/fleet/functions/f", "ok/t").refused is not None
    assert T.reply_address("ok/t", "ok/u") == protocol.ReplyAddress("ok/t", None)
    assert T.reply_address("", None) == protocol.ReplyAddress("acme/edge/nodes/n1/replies", None)


@pytest.mark.parametrize(
    "value, problem",
    [
        (["edge/fleet/"], "must not fall under edge/fleet/"),
        (["edge/nodes"], "must not fall under edge/nodes/"),
        (["edge/controllers/x/"], "must not fall under edge/controllers/"),
        (["a/+"], 'must not contain "+"'),
        (["$SYS/"], 'must not start with "$"'),
        ([""], "expected a non-empty topic prefix"),
        (["a/", "a/"], "duplicate entry"),
        ("app/", "expected a list of topic prefixes"),
    ],
)
def test_config_refuses_reply_prefixes_inside_the_contract(
    tmp_path: Path, value: Any, problem: str
) -> None:
    import tomli_w

    path = tmp_path / "agent.toml"
    path.write_text(tomli_w.dumps({"node": {"id": "n1"}, "mqtt": {"reply_prefixes": value}}))
    with pytest.raises(ConfigError, match=r"mqtt\.reply_prefixes") as caught:
        load_config(path)
    assert problem in str(caught.value)
