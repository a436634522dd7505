"""Invocations over MQTT against one real agent process: reply topics, the contract's error
types, malformed requests, overload and duplicate request ids.

One broker and one agent serve the whole module (starting them per test would dominate the
run time); every test matches its replies by a request id or reply topic of its own, so the
tests do not see each other's traffic. The agent must survive every test here: each one
that could kill it ends by checking that it still answers.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.specs import source_spec
from testing.wait import wait_for

NODE = "gw-inv"
REPLIES = f"edge/nodes/{NODE}/replies"
INVOKE = f"edge/nodes/{NODE}/invoke"
MAX_PAYLOAD = 2048
HOG_MB = 64

ECHO = "def handler(event):\n    return {'echo': event}\n"
BOOM = "def handler(event):\n    raise ValueError('boom: ' + str(event))\n"
SLEEPY = "import time\n\n\ndef handler(event):\n    time.sleep(event)\n    return 'woke'\n"
HOG = "def handler(event):\n    block = bytearray(event * 1024 * 1024)\n    return len(block)\n"
CRASH = "import os\n\n\ndef handler(event):\n    os._exit(3)\n"
NOT_JSON = "def handler(event):\n    return {1, 2, 3}\n"
NAN = "def handler(event):\n    return {'value': float('nan')}\n"
CHATTY = "def handler(event):\n    print('x' * 100000)\n    return 'said it'\n"
BIG = "def handler(event):\n    return 'x' * event\n"
SLOW = "import time\n\n\ndef handler(event):\n    time.sleep(0.2)\n    return event\n"
COUNTED = """\
import os
import time


def handler(event):
    path = os.path.join(os.environ['COUNT_DIR'], event['name'])
    with open(path, 'a') as log:
        log.write('ran\\n')
    time.sleep(event.get('sleep', 0))
    with open(path) as log:
        return {'runs': len(log.read().splitlines()), 'pid': os.getpid()}
"""


class Served:
    """The module's broker and agent, with the functions deployed."""

    def __init__(self, broker: Mosquitto, agent: AgentProcess, count_dir: Path) -> None:
        self.broker = broker
        self.agent = agent
        self.count_dir = count_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("invoke")
    count_dir = workdir / "counts"
    count_dir.mkdir()
    broker = Mosquitto(workdir).start()
    agent = AgentProcess(
        workdir,
        broker.port,
        NODE,
        agent={"max_payload_bytes": MAX_PAYLOAD},
        runtime={"max_queue": 2},
    ).start()
    cloud = Cloud(broker.port)
    try:
        cloud.wait_message(f"edge/nodes/{NODE}/status", lambda m: m["status"] == "online")
        specs = [
            source_spec("echo", ECHO),
            source_spec("boom", BOOM),
            source_spec("sleepy", SLEEPY, timeout_seconds=1),
            source_spec("hog", HOG, memory_mb=HOG_MB),
            source_spec("crash", CRASH),
            source_spec("notjson", NOT_JSON),
            source_spec("nan", NAN),
            source_spec("chatty", CHATTY),
            source_spec("big", BIG),
            source_spec("slow", SLOW, concurrency=1),
            source_spec("counted", COUNTED, environment={"COUNT_DIR": str(count_dir)}),
        ]
        for spec in specs:
            cloud.deploy(NODE, spec)
        for spec in specs:
            cloud.wait_message(
                f"edge/nodes/{NODE}/functions/{spec['id']}/state",
                lambda m: m["state"] == "active",
            )
    finally:
        cloud.close()
    yield Served(broker, agent, count_dir)
    agent.stop()
    broker.stop()


@pytest.fixture
def cloud(served: Served) -> Iterator[Cloud]:
    c = Cloud(served.broker.port)
    yield c
    c.close()


def invoke(cloud: Cloud, fid: str, payload: Any, **kw: Any) -> dict[str, Any]:
    return cloud.invoke(NODE, fid, payload, **kw)


def error_type(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    return str(reply["error"]["type"])


def messages_on(cloud: Cloud, topic: str) -> list[tuple[dict[str, Any], Any]]:
    """(payload, MQTT 5 properties) of every message recorded on ``topic``."""
    return [(json.loads(p), props) for t, p, props in list(cloud.messages) if t == topic and p]


def assert_still_serving(cloud: Cloud) -> None:
    reply = invoke(cloud, "echo", "still there?")
    assert reply["ok"] is True and reply["result"] == {"echo": "still there?"}, reply


# -- reply topics ----------------------------------------------------------------------------


def test_reply_without_address_goes_to_default_replies_topic(cloud: Cloud) -> None:
    """A request naming no reply address is answered on <p>/nodes/<node>/replies."""
    reply = invoke(cloud, "echo", {"t": [20.5, 21.0]})
    assert reply["ok"] is True
    assert reply["function_id"] == "echo"
    assert reply["result"] == {"echo": {"t": [20.5, 21.0]}}
    assert isinstance(reply["duration_ms"], float | int) and reply["duration_ms"] >= 0
    assert isinstance(reply["cold_start"], bool)
    assert reply["ts"].endswith("Z")


def test_reply_to_field_selects_the_reply_topic(cloud: Cloud) -> None:
    """`reply_to` in the request body is where the reply goes, not the default topic."""
    topic = f"edge/cloud/answers/{uuid.uuid4().hex}"
    reply = invoke(cloud, "echo", 1, reply_to=topic)
    assert reply["result"] == {"echo": 1}
    assert [m for m in cloud.on(REPLIES) if m["request_id"] == reply["request_id"]] == []


def test_mqtt5_response_topic_wins_and_correlation_data_is_echoed(cloud: Cloud) -> None:
    """The Response Topic beats `reply_to`, and the reply carries the Correlation Data."""
    rid = uuid.uuid4().hex
    response_topic = f"edge/cloud/v5/{rid}"
    ignored = f"edge/cloud/ignored/{rid}"
    correlation = b"\x00corr-" + rid.encode()
    body = {"request_id": rid, "function_id": "echo", "payload": 5, "reply_to": ignored}
    cloud.invoke_v5(NODE, json.dumps(body).encode(), response_topic, correlation)
    reply = cloud.wait_message(response_topic, lambda m: m["request_id"] == rid)
    assert reply["result"] == {"echo": 5}
    [(_, props)] = messages_on(cloud, response_topic)
    assert props.CorrelationData == correlation
    assert_still_serving(cloud)  # ordered after the reply: anything for `ignored` came first
    assert cloud.on(ignored) == []
    assert [m for m in cloud.on(REPLIES) if m.get("request_id") == rid] == []


# -- error types -----------------------------------------------------------------------------


def test_handler_exception_is_handler_error(cloud: Cloud) -> None:
    """A handler that raises gets handler_error naming the exception."""
    reply = invoke(cloud, "boom", "x")
    assert error_type(reply) == "handler_error"
    assert "ValueError" in reply["error"]["message"]
    assert "boom: x" in reply["error"]["message"]


def test_timeout_is_reported_and_agent_keeps_serving(cloud: Cloud) -> None:
    """A handler past timeout_seconds gets `timeout`; the function and the agent still serve."""
    reply = invoke(cloud, "sleepy", 30)
    assert error_type(reply) == "timeout", reply
    assert reply["duration_ms"] < 5000, reply
    again = invoke(cloud, "sleepy", 0)
    assert again["ok"] is True and again["result"] == "woke", again
    assert again["cold_start"] is True, "the timed-out worker was killed: a new one loads"
    assert_still_serving(cloud)


def test_memory_hog_is_memory_exceeded(cloud: Cloud) -> None:
    """Allocating 4x memory_mb is memory_exceeded, not a crash or a success."""
    reply = invoke(cloud, "hog", 4 * HOG_MB)
    assert error_type(reply) == "memory_exceeded", reply
    small = invoke(cloud, "hog", 1)
    assert small["ok"] is True and small["result"] == 1024 * 1024, small
    assert_still_serving(cloud)


def test_worker_exiting_is_worker_crashed(cloud: Cloud) -> None:
    """A handler calling os._exit gets worker_crashed with the exit code in the message."""
    reply = invoke(cloud, "crash", None)
    assert error_type(reply) == "worker_crashed", reply
    assert "3" in reply["error"]["message"]
    assert_still_serving(cloud)


def test_unknown_function_is_function_not_found(cloud: Cloud) -> None:
    """Invoking an id that is not deployed here gets function_not_found."""
    reply = invoke(cloud, "nope", None)
    assert error_type(reply) == "function_not_found"
    assert reply["function_id"] == "nope"


def test_non_json_result_is_handler_error(cloud: Cloud) -> None:
    """A result that cannot be JSON-encoded becomes handler_error saying so."""
    reply = invoke(cloud, "notjson", None)
    assert error_type(reply) == "handler_error", reply
    assert "JSON" in reply["error"]["message"], reply
    assert_still_serving(cloud)


def test_nan_result_is_handler_error(cloud: Cloud) -> None:
    """NaN is not JSON: a handler returning it gets handler_error, not an invalid reply."""
    reply = invoke(cloud, "nan", None)
    assert error_type(reply) == "handler_error", reply


def test_handler_printing_to_stdout_does_not_corrupt_the_reply(cloud: Cloud) -> None:
    """A handler's print() goes to the log, never into the worker's result channel."""
    reply = invoke(cloud, "chatty", None)
    assert reply["ok"] is True and reply["result"] == "said it", reply
    assert invoke(cloud, "chatty", None)["result"] == "said it"


def test_result_over_max_payload_bytes_is_not_published(cloud: Cloud) -> None:
    """agent.max_payload_bytes bounds what the agent publishes: a huge result is an error."""
    rid = uuid.uuid4().hex
    reply = invoke(cloud, "big", 10 * MAX_PAYLOAD, request_id=rid)
    [raw] = [p for t, p, _ in list(cloud.messages) if t == REPLIES and rid.encode() in p]
    assert len(raw) <= MAX_PAYLOAD, f"published a {len(raw)}-byte reply (limit {MAX_PAYLOAD})"
    assert error_type(reply) == "handler_error"


# -- malformed requests ----------------------------------------------------------------------


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


BAD_REQUESTS = [
    pytest.param(b"this is not json", None, None, id="not-json"),
    pytest.param(b"\xff\xfe\x00garbage", None, None, id="not-utf8"),
    pytest.param(b"[1, 2, 3]", None, None, id="not-an-object"),
    pytest.param(_body(function_id="echo", payload=1), None, "echo", id="missing-request-id"),
    pytest.param(_body(request_id="bad-no-fid", payload=1), "bad-no-fid", None, id="missing-fid"),
    pytest.param(
        _body(request_id="bad-no-payload", function_id="echo"),
        "bad-no-payload",
        "echo",
        id="missing-payload",
    ),
    pytest.param(
        _body(request_id=42, function_id="echo", payload=1), None, "echo", id="request-id-int"
    ),
    pytest.param(
        _body(request_id="bad-fid-type", function_id=["echo"], payload=1),
        "bad-fid-type",
        None,
        id="function-id-list",
    ),
    pytest.param(
        _body(request_id="bad-fid-dots", function_id="a.b", payload=1),
        "bad-fid-dots",
        None,
        id="function-id-with-dot",
    ),
    pytest.param(
        _body(request_id="too-big", function_id="echo", payload="x" * MAX_PAYLOAD),
        None,
        None,
        id="over-max-payload-bytes",
    ),
]


@pytest.mark.parametrize(("body", "request_id", "function_id"), BAD_REQUESTS)
def test_malformed_request_gets_bad_request_with_salvaged_ids(
    cloud: Cloud, body: bytes, request_id: str | None, function_id: str | None
) -> None:
    """A malformed invoke is answered bad_request, echoing whichever ids were valid."""
    case = uuid.uuid4().hex
    topic = f"edge/cloud/bad/{case}"
    cloud.invoke_v5(NODE, body, topic, case.encode())
    reply = cloud.wait_message(topic)
    assert error_type(reply) == "bad_request", reply
    assert reply["request_id"] == request_id, reply
    assert reply["function_id"] == function_id, reply
    assert reply["error"]["message"].startswith("invoke"), reply
    [(_, props)] = messages_on(cloud, topic)
    assert props.CorrelationData == case.encode()
    assert_still_serving(cloud)


def test_unparseable_request_without_reply_address_answers_on_default_topic(
    cloud: Cloud,
) -> None:
    """Garbage on the invoke topic (no Response Topic) gets a null-id bad_request on replies."""
    cloud.publish(INVOKE, b"{{{ garbage")
    reply = cloud.wait_message(REPLIES, lambda m: m["request_id"] is None)
    assert error_type(reply) == "bad_request"
    assert reply["function_id"] is None
    assert_still_serving(cloud)


def test_bad_request_goes_to_salvaged_reply_to(cloud: Cloud) -> None:
    """A request missing its payload is answered on its own valid `reply_to`."""
    rid = uuid.uuid4().hex
    topic = f"edge/cloud/salvaged/{rid}"
    cloud.publish(INVOKE, _body(request_id=rid, function_id="echo", reply_to=topic))
    reply = cloud.wait_message(topic, lambda m: m["request_id"] == rid)
    assert error_type(reply) == "bad_request"
    assert "payload" in reply["error"]["message"]


def test_invalid_reply_to_is_bad_request_on_default_topic(cloud: Cloud) -> None:
    """A wildcard `reply_to` cannot be published to: bad_request on the default topic."""
    rid = uuid.uuid4().hex
    cloud.publish(INVOKE, _body(request_id=rid, function_id="echo", payload=1, reply_to="a/+/b"))
    reply = cloud.wait_message(REPLIES, lambda m: m["request_id"] == rid)
    assert error_type(reply) == "bad_request"
    assert "reply_to" in reply["error"]["message"]


def test_reply_names_the_replying_node(cloud: Cloud) -> None:
    """A reply carries `node_id` (documented extra) so a shared reply_to can tell nodes apart."""
    reply = invoke(cloud, "echo", 1)
    assert reply.get("node_id") == NODE, reply


# -- overload --------------------------------------------------------------------------------


def test_flood_beyond_max_queue_is_overloaded_for_some_and_served_for_others(
    cloud: Cloud,
) -> None:
    """More invocations than concurrency + max_queue: some overloaded, the rest succeed."""
    rids = [f"flood-{uuid.uuid4().hex}" for _ in range(12)]
    for n, rid in enumerate(rids):
        cloud.publish(INVOKE, _body(request_id=rid, function_id="slow", payload=n))

    def all_answered() -> list[dict[str, Any]] | None:
        got = {m["request_id"]: m for m in cloud.on(REPLIES) if m["request_id"] in rids}
        return list(got.values()) if len(got) == len(rids) else None

    replies = wait_for(all_answered, 15, "not every flooded invocation was answered")
    kinds = [r["error"]["type"] if not r["ok"] else "ok" for r in replies]
    assert "overloaded" in kinds, kinds
    assert "ok" in kinds, kinds
    assert set(kinds) <= {"ok", "overloaded"}, kinds
    for reply in replies:
        if reply["ok"]:
            assert reply["result"] == rids.index(reply["request_id"])
    assert_still_serving(cloud)


# -- duplicate request ids -------------------------------------------------------------------


def test_sequential_duplicate_request_gets_same_reply_without_rerun(
    cloud: Cloud, served: Served
) -> None:
    """The same request_id again after its reply: the same reply, the handler ran once."""
    name = uuid.uuid4().hex
    rid = f"dup-seq-{name}"
    first = invoke(cloud, "counted", {"name": name}, request_id=rid)
    assert first["ok"] is True and first["result"]["runs"] == 1, first
    topic = f"edge/cloud/dup/{name}"
    second = invoke(cloud, "counted", {"name": name}, request_id=rid, reply_to=topic)
    assert second == first
    assert (served.count_dir / name).read_text().splitlines() == ["ran"]


def test_concurrent_duplicate_request_gets_same_reply_without_rerun(
    cloud: Cloud, served: Served
) -> None:
    """A repeat arriving while the first still runs gets the first's reply; one run only."""
    name = uuid.uuid4().hex
    rid = f"dup-conc-{name}"
    topics = [f"edge/cloud/dup/{name}/a", f"edge/cloud/dup/{name}/b"]
    marker = served.count_dir / name
    payload = {"name": name, "sleep": 0.5}
    cloud.publish(
        INVOKE, _body(request_id=rid, function_id="counted", payload=payload, reply_to=topics[0])
    )

    wait_for(marker.exists, 10, "the first invocation never started")
    cloud.publish(
        INVOKE, _body(request_id=rid, function_id="counted", payload=payload, reply_to=topics[1])
    )
    first = cloud.wait_message(topics[0], lambda m: m["request_id"] == rid)
    second = cloud.wait_message(topics[1], lambda m: m["request_id"] == rid)
    assert first["ok"] is True and first["result"]["runs"] == 1, first
    assert second == first
    assert marker.read_text().splitlines() == ["ran"]


def test_request_id_repeated_after_dedupe_window_is_a_new_request(
    cloud: Cloud, served: Served, tmp_path: Path
) -> None:
    """With agent.dedupe_window_s = 0 nothing is remembered: a repeated id runs again."""
    node = "gw-nodedupe"
    agent = AgentProcess(tmp_path, served.broker.port, node, agent={"dedupe_window_s": 0.0})
    agent.start()
    try:
        cloud.wait_message(f"edge/nodes/{node}/status", lambda m: m["status"] == "online")
        spec = source_spec("counted", COUNTED, environment={"COUNT_DIR": str(tmp_path)})
        cloud.deploy(node, spec)
        cloud.wait_message(
            f"edge/nodes/{node}/functions/counted/state", lambda m: m["state"] == "active"
        )
        rid = f"window-{uuid.uuid4().hex}"
        first = cloud.invoke(node, "counted", {"name": rid}, request_id=rid)
        topic = f"edge/cloud/window/{rid}"
        second = cloud.invoke(node, "counted", {"name": rid}, request_id=rid, reply_to=topic)
    finally:
        agent.stop()
    assert first["result"]["runs"] == 1, first
    assert second["result"]["runs"] == 2, "the repeat was answered from the dedupe table"


def test_duplicate_over_mqtt5_carries_its_own_correlation_data(cloud: Cloud) -> None:
    """A repeated request is answered on its own Response Topic with its own Correlation Data."""
    rid = f"dup-v5-{uuid.uuid4().hex}"
    body = json.dumps({"request_id": rid, "function_id": "echo", "payload": "twice"}).encode()
    topics = [f"edge/cloud/v5dup/{rid}/1", f"edge/cloud/v5dup/{rid}/2"]
    for n, topic in enumerate(topics):
        cloud.invoke_v5(NODE, body, topic, f"corr-{n}".encode())
        cloud.wait_message(topic, lambda m: m["request_id"] == rid)
    first, second = (messages_on(cloud, topic) for topic in topics)
    assert first[0][0] == second[0][0], "a duplicate must get the same reply"
    assert first[0][1].CorrelationData == b"corr-0"
    assert second[0][1].CorrelationData == b"corr-1"
