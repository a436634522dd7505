"""``RemoteRuntime``: the seed's ``EdgeRuntime`` face for one node of a remote fleet.

Owns nothing but the node id: every call goes through the
:class:`~agent.cloud.controller.FleetController`. ``invoke`` is a request/response over MQTT
with a deadline and raises the same exception classes as local mode (``FunctionTimeout``,
``HandlerError``, ``FunctionNotFound``, ...), rebuilt from the reply's ``error{type,
message}``; a reply that never comes is a ``ReplyTimeout``, which is a ``FunctionTimeout``.

Must never: import paho or keep state of its own about the node (ask the controller).
"""

from __future__ import annotations

from typing import Any

from agent.cloud.controller import FleetController
from agent.cloud.invoke import RemoteResult
from agent.cloud.specs import spec_from_function
from agent.contract import protocol
from agent.errors import BadRequest
from agent.models import EdgeFunction, EdgeNode


class RemoteRuntime:
    """One remote node, as ``EdgeCluster.get_runtime(node_id)`` returns it in remote mode."""

    def __init__(self, controller: FleetController, node_id: str) -> None:
        self._controller = controller
        self.node_id = node_id

    @property
    def node(self) -> EdgeNode | None:
        """The node as the controller sees it now (None once it was forgotten)."""
        return self._controller.node(self.node_id)

    def invoke(self, function_id: str, *args: Any, **kwargs: Any) -> Any:
        """Invoke over MQTT and return the handler's value.

        Over the wire a handler takes one JSON payload: ``invoke(fid, payload)``; with no
        argument the payload is ``null``. Anything else is a ``BadRequest`` (a ValueError).
        """
        if kwargs or len(args) > 1:
            raise BadRequest(
                f"invoke {function_id} on {self.node_id}: a remote function takes one JSON "
                f"payload, invoke(function_id, payload); got {len(args)} positional and "
                f"{len(kwargs)} keyword arguments"
            )
        return self.execute(function_id, args[0] if args else None).value

    def execute(
        self, function_id: str, payload: Any = None, *, timeout: float | None = None
    ) -> RemoteResult:
        """Like ``invoke`` but returns the whole reply (duration, cold start, round trip)."""
        return self._controller.invoke(self.node_id, function_id, payload, timeout=timeout)

    def deploy(self, function: EdgeFunction | protocol.FunctionSpec) -> protocol.FunctionSpec:
        """Publish a per-node spec for this node (it overrides the fleet's); the spec."""
        spec = spec_from_function(function)
        self._controller.publish_spec(spec, self.node_id)
        return spec

    def undeploy(self, function_id: str) -> bool:
        """Clear this node's own spec (it falls back to the fleet spec, if any); True when
        it had one."""
        return self._controller.clear_spec(function_id, self.node_id)

    def list_functions(self) -> list[dict[str, Any]]:
        """The node's retained function states (``function_id``, ``version``, ``state``...)."""
        states = self._controller.function_states(self.node_id)
        return [states[fid] for fid in sorted(states)]

    def close(self) -> None:
        """Nothing to stop: the connection belongs to the cluster."""

    def __enter__(self) -> RemoteRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
