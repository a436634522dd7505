"""A broker that forgets (issue 12, item 8).

Before: after a restart of a broker without persistence, the retained function states were
lost and never published again (only the status was): a controller that connected
afterwards saw the node but none of its functions. Real mosquitto (``persistence false``,
as conftest's brokers are), a real agent process.
"""

from __future__ import annotations

from collections.abc import Callable

from testing.agent_process import AgentProcess
from testing.broker import Mosquitto
from testing.cloud import Cloud
from testing.specs import source_spec

NODE = "gw-test"
STATUS = f"edge/nodes/{NODE}/status"
STATE = "edge/nodes/gw-test/functions/{}/state"

AgentFactory = Callable[..., AgentProcess]


def test_function_states_are_retained_again_after_broker_restart_without_persistence(
    broker: Mosquitto, agent_factory: AgentFactory
) -> None:
    """A lost session (session_present false) republished the status but no function state."""
    assert "persistence false" in broker.conf.read_text()
    fids = ("alpha", "beta", "gamma")
    cloud = Cloud(broker.port)
    try:
        agent_factory().start()
        cloud.wait_message(STATUS, lambda m: m["status"] == "online")
        for fid in fids:
            cloud.deploy(None, source_spec(fid, "def handler(e):\n    return e\n"))
            cloud.wait_message(STATE.format(fid), lambda m: m["state"] == "active")
    finally:
        cloud.close()

    broker.restart()  # retained messages and sessions are gone with the old process

    watcher = Cloud(broker.port)  # sees the agent come back and republish, live
    try:
        watcher.wait_message(STATUS, lambda m: m["status"] == "online", timeout=15)
        for fid in fids:
            watcher.wait_message(STATE.format(fid), lambda m: m["state"] == "active")
    finally:
        watcher.close()
    late = Cloud(broker.port)  # connects afterwards: only retained messages reach it now
    try:
        for fid in fids:
            state = late.wait_message(STATE.format(fid), timeout=5)
            assert state["state"] == "active" and state["function_id"] == fid, state
        assert late.wait_message(STATUS)["status"] == "online"
    finally:
        late.close()
