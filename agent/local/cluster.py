"""``EdgeCluster``: the seed's cluster of edge nodes, local or remote.

Local mode (``EdgeCluster()``): nodes are registered by hand and each gets an in-process
:class:`~agent.local.runtime.EdgeRuntime` (worker subprocesses on this machine).

Remote mode (``EdgeCluster.connect(host, port, ...)``): the nodes are real gateways running
``edge-agent``, discovered from their retained status topics and kept current from their
heartbeats by an :class:`~agent.cloud.FleetController`. The seed's methods keep their
meaning (``list_nodes``, ``get_node``, ``heartbeat``, ``deploy_to_all`` returning the number
of nodes targeted); ``get_runtime`` returns a :class:`~agent.cloud.RemoteRuntime` whose
``invoke`` goes over MQTT. Deployments publish retained specs; ``wait_for_rollout`` and
``rollout`` (canaries first) follow them to per-node results.

This module builds nothing itself in remote mode: the connection, the view and the
rollouts live in :mod:`agent.cloud`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from agent.local.runtime import EdgeRuntime
from agent.models import EdgeFunction, EdgeNode, EdgeNodeStatus

if TYPE_CHECKING:  # remote mode's modules (and paho) load only when a cluster connects
    from agent.cloud import FleetController, RemoteRuntime, RolloutReport, StagedRollout
    from agent.cloud.deploy import Progress
    from agent.contract import protocol
    from agent.mqtt import MqttSettings

    FunctionLike = EdgeFunction | protocol.FunctionSpec


class EdgeCluster:
    """Manage a cluster of edge nodes: in this process, or a fleet over MQTT."""

    def __init__(self, *, controller: FleetController | None = None) -> None:
        self._nodes: dict[str, EdgeNode] = {}
        self._runtimes: dict[str, EdgeRuntime] = {}
        self._remote = controller

    @classmethod
    def connect(
        cls,
        host: str | Sequence[str | tuple[str, int]] = "127.0.0.1",
        port: int = 1883,
        *,
        brokers: Sequence[str | tuple[str, int]] = (),
        prefix: str = "edge",
        tls: bool = False,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        username: str = "",
        password: str = "",
        password_file: str = "",
        protocol: str = "5",
        heartbeat_interval_s: float = 30.0,
        invoke_timeout_s: float = 30.0,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        settings: MqttSettings | None = None,
        sign_key: str | None = None,
        view_qos: int = 1,
        reply_qos: int | None = None,
        retained_wildcards: str = "auto",
        rollcall_window_s: float = 2.0,
    ) -> EdgeCluster:
        """A remote-mode cluster, connected and with every retained node status ingested.

        ``heartbeat_interval_s`` is the agents' heartbeat interval (a node silent for three
        of them is OFFLINE). ``settings`` replaces every connection argument when given.

        A clustered broker: ``brokers=["10.0.0.1:1883", "10.0.0.2:1883", ...]`` (or
        ``(host, port)`` pairs, or that list as ``host``). The controller starts at a random
        entry and moves to the next whenever a connection fails or is lost, re-subscribing
        and re-reading the retained state there. ``view_qos=0`` subscribes the view's
        filters at QoS 0: with the controller's clean session QoS 1 adds nothing across a
        reconnect (the retained state is replayed on every subscribe), and on a NATS cluster
        each QoS 1 filter is a JetStream consumer that cannot be created while the cluster
        elects leaders after a node died. Keep 1 on a single broker under heavy load, which
        may drop QoS 0 deliveries to a slow subscriber.
        ``reply_qos`` is the QoS of the controller's reply subscription; by default 0 with
        more than one broker (a cluster) and 1 otherwise. On a NATS cluster a QoS 1
        subscription that stays connected through the death of another node has been seen
        to stop delivering for good (its JetStream consumer is not repaired), while QoS 0
        delivery carried on; a reply lost either way comes again, because ``invoke`` asks a
        late request again and the agent answers the copy from its dedupe table.
        Raises :class:`~agent.cloud.BrokerUnreachable` when the broker cannot be reached
        within ``timeout`` seconds, ``ConfigError`` for unusable TLS files.

        ``retained_wildcards``: ``"auto"`` probes whether the broker replays retained
        messages to wildcard subscriptions; where it does not (``"no"``: RabbitMQ before
        3.13) the controller reads the specs through the retained indexes and calls a roll
        call, waiting ``rollcall_window_s`` for the nodes' answers (docs/protocol.md).

        ``sign_key`` is a private key file (``edgectl keygen``): every spec the cluster
        publishes is then signed (ConfigError when the file is unusable or others can
        read it).
        """
        from agent.cloud import FleetController
        from agent.mqtt import MqttSettings
        from agent.trust import Signer

        signer = Signer.from_file(sign_key) if sign_key else None
        if not isinstance(host, str):
            brokers, host = host, "127.0.0.1"
        endpoints = tuple(_endpoint(entry) for entry in brokers)

        settings = settings or MqttSettings.for_controller(
            host,
            port,
            brokers=endpoints,
            one_shot=False,  # a long-running controller: the longer reconnect backoff
            timeout_s=timeout,
            protocol=protocol,
            username=username,
            password=password,
            password_file=password_file,
            tls=tls,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )
        if reply_qos is None:
            reply_qos = 0 if len(settings.endpoints()) > 1 else 1
        controller = FleetController(
            settings,
            prefix=prefix,
            heartbeat_interval_s=heartbeat_interval_s,
            invoke_timeout_s=invoke_timeout_s,
            clock=clock,
            signer=signer,
            view_qos=view_qos,
            reply_qos=reply_qos,
            retained_wildcards=retained_wildcards,
            rollcall_window_s=rollcall_window_s,
        )
        controller.start(timeout)
        return cls(controller=controller)

    @property
    def remote(self) -> bool:
        return self._remote is not None

    @property
    def controller(self) -> FleetController:
        """The fleet controller behind a remote-mode cluster (ValueError in local mode)."""
        if self._remote is None:
            raise ValueError("a local EdgeCluster has no fleet controller: use connect()")
        return self._remote

    # -- the seed's API ----------------------------------------------------------------------

    def register_node(self, node: EdgeNode) -> None:
        """Register an edge node (re-registering an id replaces it and its runtime).

        Remote mode: nodes register themselves by connecting; this raises ValueError.
        """
        if self._remote is not None:
            raise ValueError(
                f"{node.id}: in remote mode nodes register themselves when their agent "
                "connects to the broker"
            )
        old = self._runtimes.pop(node.id, None)
        if old is not None:
            old.close()
        self._nodes[node.id] = node
        self._runtimes[node.id] = EdgeRuntime(node)

    def deregister_node(self, node_id: str) -> bool:
        """Forget a node. Remote mode: clears its retained status and function states
        (decommissioning); an agent that connects again registers again."""
        if self._remote is not None:
            return self._remote.forget_node(node_id)
        if node_id not in self._nodes:
            return False
        del self._nodes[node_id]
        self._runtimes.pop(node_id).close()
        return True

    def get_node(self, node_id: str) -> EdgeNode | None:
        if self._remote is not None:
            return self._remote.node(node_id)
        return self._nodes.get(node_id)

    def get_runtime(self, node_id: str) -> EdgeRuntime | RemoteRuntime | None:
        if self._remote is not None:
            from agent.cloud import RemoteRuntime

            known = self._remote.node(node_id) is not None
            return RemoteRuntime(self._remote, node_id) if known else None
        return self._runtimes.get(node_id)

    def list_nodes(self, status: EdgeNodeStatus | None = None) -> list[EdgeNode]:
        if self._remote is not None:
            return self._remote.nodes(status)
        nodes = list(self._nodes.values())
        if status:
            nodes = [n for n in nodes if n.status == status]
        return nodes

    def deploy_to_all(self, function: FunctionLike) -> int:
        """Deploy to every ONLINE node; returns how many nodes got it.

        Local mode: the seed also deployed to offline nodes; a function cannot run there, so
        they are skipped here (they get it when they come back and are deployed to again).
        Remote mode: publishes the retained fleet spec and returns how many nodes it targets
        now (not offline, capabilities cover ``requires``); nodes that join later get it from
        the retained topic. ``wait_for_rollout`` follows their results.
        """
        if self._remote is not None:
            from agent.cloud import spec_from_function

            return len(self._remote.deploy_fleet(spec_from_function(function)))
        if not isinstance(function, EdgeFunction):
            raise ValueError("a local EdgeCluster deploys EdgeFunction objects, not wire specs")
        count = 0
        for node_id, runtime in self._runtimes.items():
            if self._nodes[node_id].status is EdgeNodeStatus.OFFLINE:
                continue
            runtime.deploy(function)
            count += 1
        return count

    def heartbeat(self, node_id: str) -> None:
        """Mark a node ONLINE now; an unknown id is a no-op."""
        if self._remote is not None:
            self._remote.heartbeat(node_id)
            return
        node = self._nodes.get(node_id)
        if node is not None:
            node.last_heartbeat = datetime.now()
            node.status = EdgeNodeStatus.ONLINE

    # -- deployments beyond the seed (remote mode) -------------------------------------------

    def deploy_to_node(self, node_id: str, function: FunctionLike) -> protocol.FunctionSpec:
        """Publish a per-node spec (it overrides the fleet spec there); the spec."""
        from agent.cloud import spec_from_function

        spec = spec_from_function(function)
        self.controller.publish_spec(spec, node_id)
        return spec

    def undeploy(self, function_id: str, node_id: str | None = None) -> bool:
        """Clear the fleet spec (``node_id`` None: every node without its own removes it) or
        one node's own spec; True when there was one."""
        return self.controller.clear_spec(function_id, node_id)

    def wait_for_rollout(
        self,
        function: FunctionLike,
        nodes: Iterable[str] | None = None,
        *,
        timeout: float = 60.0,
        on_progress: Progress | None = None,
    ) -> RolloutReport:
        """Wait for each node's result (active / rejected / failed / offline) for this exact
        spec (version and sha256), or the deadline (then ``timed_out``, ``pending`` nodes)."""
        from agent.cloud import spec_from_function

        spec = spec_from_function(function)
        return self.controller.wait_rollout(spec, nodes, timeout, on_progress)

    def rollout(
        self,
        function: FunctionLike,
        *,
        canary: int | float | str = "10%",
        max_failures: int = 0,
        canary_timeout: float = 60.0,
        timeout: float = 120.0,
        on_progress: Progress | None = None,
    ) -> StagedRollout:
        """Canaries first, then the fleet; the canaries go back to their previous spec when
        more than ``max_failures`` of them do not become active (see agent.cloud.controller)."""
        from agent.cloud import spec_from_function

        return self.controller.staged_rollout(
            spec_from_function(function),
            canary=canary,
            max_failures=max_failures,
            canary_timeout_s=canary_timeout,
            timeout_s=timeout,
            on_progress=on_progress,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        for runtime in self._runtimes.values():
            runtime.close()
        if self._remote is not None:
            self._remote.close()

    def __enter__(self) -> EdgeCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _endpoint(entry: str | tuple[str, int]) -> tuple[str, int]:
    """A broker list entry: ``"host:port"`` or a ``(host, port)`` pair (ValueError if bad)."""
    from agent.config import split_broker

    if isinstance(entry, str):
        return split_broker(entry)
    host, port = entry
    if not host or not 0 < int(port) < 65536:
        raise ValueError(f"not a broker address: {entry!r}")
    return host, int(port)
