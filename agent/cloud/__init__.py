"""The fleet controller: the cloud side of the wire contract, over MQTT.

::

    view.py        FleetView: pure state machine over status, heartbeats, function states
    rollout.py     targets, canaries, per-node results (pure)
    specs.py       function specs from code on disk (a module, a zip, a directory)
    controller.py  FleetController: the connection, the fence, the ingest thread; composes:
      link.py        ControllerLink: the lock, the view, publish with PUBACK and resend
      publishing.py  SpecPublisher: specs, spec indexes, forgetting a node
      deploy.py      Rollouts: wait_rollout (canary repush), staged rollout, rollback
      invoke.py      Invocations: request/response, re-asking late replies; RemoteResult
      probe.py       WildcardProbe: does the broker replay retained messages to wildcards
    remote.py      RemoteRuntime: EdgeRuntime's face for one remote node
    mirror.py      the cloud side of state sync
    ctl/           edgectl, the operator's command line (the cloud side's composition root)

``agent.local.cluster.EdgeCluster.connect(...)`` is the seed-shaped entry point; ``edgectl``
(``agent/cloud/ctl/``) is the operator's. Imports point down: this package uses the contract,
mqtt, errors, models, trust, config and exec.bundles (``make_zip_bundle``), and nothing here
imports ``agent.local``, ``agent.edge`` or ``agent.store`` (``mirror`` takes ``apply_delta``
from ``agent.contract.sync``; tests/test_layers.py checks every arrow).
"""

from __future__ import annotations

from agent.cloud.controller import (
    BrokerUnreachable,
    FleetController,
    PublishRefused,
    ReplyTimeout,
)
from agent.cloud.invoke import RemoteResult
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
