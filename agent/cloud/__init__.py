"""The fleet controller: the cloud side of the wire contract, over MQTT.

::

    view.py        FleetView: pure state machine over status, heartbeats, function states
    rollout.py     targets, canaries, per-node results (pure)
    specs.py       function specs from code on disk (a module, a zip, a directory)
    controller.py  FleetController: the connection, the ingest thread, deploy/roll out/invoke
    remote.py      RemoteRuntime: EdgeRuntime's face for one remote node

``agent.local.cluster.EdgeCluster.connect(...)`` is the seed-shaped entry point; ``edgectl``
(``agent/cloud/ctl.py``) is the operator's. Imports point down: this package uses protocol, mqtt,
errors, models and bundles, and nothing here imports ``cluster``, ``ctl`` or ``cli``.
"""

from __future__ import annotations

from agent.cloud.controller import (
    BrokerUnreachable,
    FleetController,
    PublishRefused,
    RemoteResult,
    ReplyTimeout,
)
from agent.cloud.remote import RemoteRuntime
from agent.cloud.rollout import NodeResult, RolloutReport, StagedRollout, canary_count
from agent.cloud.specs import function_spec, spec_from_function
from agent.cloud.view import FleetView, NodeRecord

__all__ = [
    "BrokerUnreachable",
    "FleetController",
    "FleetView",
    "NodeRecord",
    "NodeResult",
    "PublishRefused",
    "RemoteResult",
    "RemoteRuntime",
    "ReplyTimeout",
    "RolloutReport",
    "StagedRollout",
    "canary_count",
    "function_spec",
    "spec_from_function",
]
