"""Fakes that let a test drive the daemon's loop (``agent.edge.loop.Agent``) in-process:
no socket, no process spawned, no sleep.

- :class:`FakeClock`: the loop's monotonic clock (``Agent(clock=...)``); moves only on
  :meth:`FakeClock.advance`.
- :class:`FakeMqttClient`: the subset of ``agent.mqtt.MqttClient`` the loop uses
  (``agent.edge.uplink.Transport``). Records every publish with its mid, keeps QoS 1 ones
  unacknowledged until the test sends the PUBACK, and lets the test deliver messages and
  connection events into the agent (``Message``, ``Connected``, ``Disconnected``,
  ``Published``), as paho's network thread would.
- :class:`FakePool`: stands in for ``agent.exec.pool.WorkerPool``: functions register,
  test-load and run in-process through Python callables (``handlers``).
- :class:`InlineExecutor`: runs an invocation at once on the caller's thread (the loop's),
  so its outcome is posted before ``submit`` returns: no executor thread to wait for.

Must never: start a broker, open a socket or spawn a process; nothing under ``agent/``
imports it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import sys
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from agent.edge.uplink import Transport
from agent.errors import EdgeExecutionError, FunctionNotFound
from agent.exec.pool import ContextInput, FunctionConfig, InvokeResult, Worker, WorkerPool
from agent.exec.pool.config import ContextSource, OnResult
from agent.mqtt import Connected, Disconnected, Message, Published

_P = ParamSpec("_P")
_T = TypeVar("_T")


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds``; the new time."""
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self.now += seconds
        return self.now


# -- MQTT --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One message the agent handed to the client."""

    mid: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation_data: bytes | None = None
    response_topic: str | None = None
    #: Sent again by the client itself after a reconnect (paho resends unacknowledged QoS 1).
    resent: bool = False
    #: Handed over inside ``corked()`` (the loop's batch): its wake-up was shared.
    corked: bool = False

    def json(self) -> Any:
        return json.loads(self.payload)


class FakeMqttClient:
    """``agent.mqtt.MqttClient`` without a broker (see the module docstring).

    Takes ``build_agent``'s ``mqtt_factory`` arguments too: ``(settings, sink, *, will,
    subscriptions, ...)``; or build it bare and set ``sink`` (``agent.post``).
    """

    def __init__(
        self,
        settings: object = None,
        sink: Callable[[object], None] | None = None,
        *,
        subscriptions: list[str] | None = None,
        **_options: object,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.subscriptions: list[str] = list(subscriptions or [])
        self.published: list[Sent] = []
        self.acked: list[Message] = []
        self.forgotten: list[int] = []
        self.started = False
        self.stopped = False
        self.connected = False
        self._mids = itertools.count(1)
        self._incoming = itertools.count(1)
        self._connection = 0
        #: How many times ``corked()`` was entered, and whether it is now.
        self.corks = 0
        self.corked_now = False
        #: Incoming messages acknowledged inside ``corked()``.
        self.acked_corked = 0
        #: QoS 1 messages sent and not yet acknowledged (by the test's ``puback``), by mid.
        self.unacked: dict[int, Sent] = {}

    # -- what the agent calls (agent.edge.uplink.Transport) -------------------------------

    def start(self) -> None:
        self.started = True

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped = True
        self.connected = False

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
    ) -> int:
        mid = next(self._mids)
        sent = Sent(
            mid, topic, bytes(payload), qos, retain, correlation_data, response_topic,
            corked=self.corked_now,
        )  # fmt: skip
        self.published.append(sent)
        if qos > 0:
            self.unacked[mid] = sent
        return mid

    def ack(self, msg: Message) -> None:
        """Recorded only for a QoS 1 message of the current connection, as paho would."""
        if msg.qos > 0 and msg.connection == self._connection and self.connected:
            self.acked.append(msg)
            self.acked_corked += self.corked_now

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """As paho's: what is published or acked inside is recorded as it is called."""
        if self.corked_now:
            raise AssertionError("corked() entered twice: the loop corks once per batch")
        self.corks += 1
        self.corked_now = True
        try:
            yield
        finally:
            self.corked_now = False

    def forget(self, mid: int) -> bool:
        self.forgotten.append(mid)
        return self.unacked.pop(mid, None) is not None

    def subscribe(self, topics: list[str], qos: int = 1) -> None:
        self.subscriptions.extend(t for t in topics if t not in self.subscriptions)

    def unsubscribe(self, topics: list[str]) -> None:
        self.subscriptions = [t for t in self.subscriptions if t not in topics]

    # -- what the test calls: events into the agent ---------------------------------------

    def _post(self, event: object) -> None:
        if self.sink is None:
            raise RuntimeError("FakeMqttClient has no sink: pass agent.post")
        self.sink(event)

    def connect(self, *, session_present: bool = True) -> None:
        """A (re)connection: unacknowledged QoS 1 messages go out again, then Connected."""
        self._connection += 1
        self.connected = True
        for sent in list(self.unacked.values()):
            again = Sent(
                sent.mid,
                sent.topic,
                sent.payload,
                sent.qos,
                sent.retain,
                sent.correlation_data,
                sent.response_topic,
                resent=True,
            )
            self.published.append(again)
        self._post(Connected(session_present))

    def disconnect(self, reason: str = "connection lost (fake)") -> None:
        self.connected = False
        self._post(Disconnected(reason))

    def deliver(
        self,
        topic: str,
        payload: bytes | Mapping[str, Any],
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        dup: bool = False,
    ) -> Message:
        """An incoming message (a mapping is sent as JSON); the Message posted."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        msg = Message(
            topic=topic,
            payload=data,
            qos=qos,
            retain=retain,
            mid=next(self._incoming),
            response_topic=response_topic,
            correlation_data=correlation_data,
            connection=self._connection,
            dup=dup,
        )
        self._post(msg)
        return msg

    def puback(self, mid: int, reason_code: int = 0, reason: str = "Success") -> None:
        """The broker's answer to QoS 1 message ``mid``."""
        self.unacked.pop(mid, None)
        self._post(Published(mid, reason_code, reason))

    def puback_all(self) -> list[int]:
        """PUBACK every unacknowledged message, oldest first; their mids."""
        mids = sorted(self.unacked)
        for mid in mids:
            self.puback(mid)
        return mids

    # -- what the test reads --------------------------------------------------------------

    def on(self, topic: str) -> list[Sent]:
        """Messages sent to ``topic`` (first sends only, not the client's own resends)."""
        return [s for s in self.published if s.topic == topic and not s.resent]

    def json_on(self, topic: str) -> list[Any]:
        return [s.json() for s in self.on(topic) if s.payload]


# -- the pool ----------------------------------------------------------------------------


@dataclass
class Writes:
    """A fake handler's result that also writes the synced state (``context.state``)."""

    value: Any
    changes: dict[str, Any] = field(default_factory=dict)


#: A fake function: (the invoke's payload, its context) -> the result, a :class:`Writes`,
#: or an ``EdgeExecutionError`` raised (a handler error, a timeout...).
Handler = Callable[[Any, ContextInput], Any]


def _echo(payload: Any, context: ContextInput) -> Any:
    return payload


class _FakeWorker(Worker):
    """What ``check_load`` hands back: no process behind it."""

    def __init__(self, function_id: str) -> None:  # no super().__init__: nothing to spawn
        self.function_id = function_id
        self.pid = 0


class FakePool(WorkerPool):
    """``WorkerPool`` with the processes replaced by ``handlers`` (function id -> callable).

    A deployed function without a handler echoes its payload. ``load_errors`` makes a
    test-load fail (function id -> the error ``check_load`` raises).
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler] | None = None,
        *,
        max_workers: int = 4,
        python: str = sys.executable,
        user: str | None = None,
    ) -> None:
        super().__init__(max_workers=max_workers, prestart=0, codec="json", python=python)
        self.user = user
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.load_errors: dict[str, EdgeExecutionError] = {}
        self.registered: dict[str, FunctionConfig] = {}
        #: Every check_load, in order (the deployer's test-loads).
        self.loads: list[FunctionConfig] = []
        #: Every invocation, in order: (function id, payload).
        self.calls: list[tuple[str, Any]] = []
        self.started = False
        self.closed = False
        self.swept: list[list[int]] = []

    def start(self) -> None:
        self.started = True

    def close(self, timeout: float = 5.0) -> None:
        self.closed = True
        self.registered.clear()

    def reconfigure(
        self, *, max_workers: int, max_queue: int, max_invocations: int, prestart: int
    ) -> None:
        super().reconfigure(
            max_workers=max_workers,
            max_queue=max_queue,
            max_invocations=max_invocations,
            prestart=prestart,
        )

    def wait_prestarted(self, timeout: float = 10.0) -> bool:
        return True

    def worker_pids(self) -> list[int]:
        return []

    def sweep(self, uids: Collection[int]) -> int:
        self.swept.append(sorted(uids))
        return 0

    def register(self, config: FunctionConfig, preloaded: Worker | None = None) -> None:
        self.registered[config.function_id] = config

    def unregister(self, function_id: str) -> bool:
        return self.registered.pop(function_id, None) is not None

    def concurrency(self, function_id: str) -> int:
        config = self.registered.get(function_id)
        return config.concurrency if config is not None else 1

    def check_load(self, config: FunctionConfig) -> Worker:
        self.loads.append(config)
        error = self.load_errors.get(config.function_id)
        if error is not None:
            raise error
        return _FakeWorker(config.function_id)

    def discard(self, worker: Worker) -> None:
        pass

    def limits_mode(self, function_id: str) -> str:
        return "rlimit"

    def has_function(self, function_id: str) -> bool:
        return function_id in self.registered

    def functions(self) -> list[str]:
        return list(self.registered)

    def invoke(
        self,
        function_id: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        request_id: str = "",
        queue_timeout: float | None = None,
        context: ContextSource = None,
        on_result: OnResult | None = None,
        request_json: bytes | None = None,
    ) -> InvokeResult:
        if function_id not in self.registered:
            raise FunctionNotFound(f"Function not found: {function_id}")
        if request_json is not None:  # as the worker reads it
            payload = json.loads(request_json.decode("utf-8"))["payload"]
        else:
            payload = args[0] if args else None
        self.calls.append((function_id, payload))
        if isinstance(context, ContextInput):
            ctx = context
        else:
            ctx = context() if context is not None else ContextInput()
        handler = self.handlers.get(function_id, _echo)
        value = handler(payload, ctx)
        result = InvokeResult(
            value=value,
            cold_start=False,
            duration_ms=0.0,
            rss_kb=0,
            worker_pid=0,
            accepts_context=True,
            state_version=ctx.state_version,
        )
        if isinstance(value, Writes):
            result.value = value.value
            if value.changes:
                result.changes = dict(value.changes)
                result.checked = list(value.changes)
        if result.changes and on_result is not None:
            on_result(result)
        return result


class InlineExecutor(Executor):
    """Runs what is submitted at once, on the submitting thread."""

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        future: Future[_T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the Future carries it, as a thread's would
            future.set_exception(exc)
        return future


class HeldExecutor(Executor):
    """Keeps what is submitted until the test runs it (``run_all``), on the test's thread:
    invocations that are still running for as long as the test wants."""

    def __init__(self) -> None:
        self.held: list[tuple[Callable[[], Any], Future[Any]]] = []

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        future: Future[_T] = Future()
        self.held.append((functools.partial(fn, *args, **kwargs), future))
        return future

    def run_all(self) -> int:
        """Run everything held, in submission order; how many."""
        held, self.held = self.held, []
        for call, future in held:
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)
        return len(held)


def _is_a_transport(client: FakeMqttClient) -> Transport:
    return client  # mypy checks the fake against what the daemon calls
