"""agent.errors holds the whole tree; the old import paths and wire ``type`` strings stay."""

from __future__ import annotations

from agent import errors, mqtt, store
from agent.cloud import BrokerUnreachable, PublishRefused, ReplyTimeout, controller
from agent.contract import protocol


def test_moved_classes_are_the_same_objects_at_their_old_paths() -> None:
    assert mqtt.MqttError is errors.MqttError
    assert protocol.InvokeDecodeError is errors.InvokeDecodeError
    assert store.OutboxFull is errors.OutboxFull
    assert controller.BrokerUnreachable is BrokerUnreachable is errors.BrokerUnreachable
    assert controller.PublishRefused is PublishRefused is errors.PublishRefused
    assert controller.ReplyTimeout is ReplyTimeout is errors.ReplyTimeout


def test_places_and_type_strings_in_the_tree() -> None:
    assert issubclass(errors.MqttError, errors.AgentError)
    assert errors.MqttError.type == "mqtt_error"
    assert issubclass(errors.PublishRefused, errors.BrokerUnreachable)
    assert errors.BrokerUnreachable.type == "broker_unreachable"
    assert errors.PublishRefused.type == "publish_refused"
    assert issubclass(errors.ReplyTimeout, errors.FunctionTimeout)
    assert issubclass(errors.ReplyTimeout, TimeoutError)
    assert errors.ReplyTimeout.type == "timeout"
    assert issubclass(errors.InvokeDecodeError, errors.BadRequest)
    assert errors.InvokeDecodeError.type == "bad_request"
    # Backpressure, on its own branch: a handler of store faults must not catch it.
    assert issubclass(errors.OutboxFull, errors.AgentError)
    assert not issubclass(errors.OutboxFull, errors.StoreError)
    assert not issubclass(errors.OutboxFull, errors.EdgeExecutionError)
    assert issubclass(store.StateTooLarge, errors.StoreError)


def test_every_class_of_the_tree_is_in_the_docstring() -> None:
    doc = errors.__doc__ or ""
    for name, value in vars(errors).items():
        if isinstance(value, type) and issubclass(value, errors.AgentError):
            assert name in doc, name
    assert "StateTooLarge" in doc
    # OutboxFull is drawn on its own branch, directly under AgentError (not under StoreError).
    tree = doc.split("::", 1)[1].split("\n\n", 2)[1]
    [line] = [ln for ln in tree.splitlines() if "OutboxFull" in ln]
    assert line.startswith("    ├── OutboxFull"), line


def test_wire_forms() -> None:
    bad = errors.InvokeDecodeError("invoke: payload: missing", request_id="r1")
    assert errors.error_to_dict(bad) == {"type": "bad_request", "message": str(bad)}
    assert errors.error_to_dict(errors.ReplyTimeout("late"))["type"] == "timeout"
    full = errors.OutboxFull("x", depth=(1, 1))
    for local in (errors.MqttError("x"), errors.BrokerUnreachable("x"), full):
        assert errors.error_to_dict(local)["type"] == "handler_error"
