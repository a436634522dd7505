"""Invocations on the loop's side: admitting, dispatching and answering them.

Owns: the invocations accepted and not yet answered (``inflight``, by request id), the fair
queue that bounds and orders them per function (:mod:`agent.edge.invoke_queue`), the executor
threads that run them in the pool, duplicates (a copy while the first runs, a request
already answered within ``agent.dedupe_window_s``), and the durable record of an accepted
invoke (:mod:`agent.store.accepted`) with its recovery after a restart.

Delivery: an incoming invoke is acknowledged to the broker once its reply is in the outbox
or, if it still runs ``agent.record_accepted_after_s`` after it was accepted, once it is on
record as accepted (brokers with an ack deadline); a crash before that means redelivery, or
a run again at start. A fast invocation (the common case) so costs no write of its own: its
reply's transaction is the only one. Outbox full: new invocations are
answered ``overloaded`` (published directly, not queued) until it drains. A run of
finished invocations is answered with one transaction (group commit: replies, dedupe rows
and the deletes of their accepted records), then acknowledged, then drained once.

Threads: :meth:`Invocations.run` and :meth:`Invocations.apply_state` run on an executor
thread and only post :class:`InvokeDone` to the loop; everything else runs on the loop.

Must never: publish by itself (replies go through :mod:`agent.edge.replies`) or block the
loop on a worker.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

from agent import mqtt
from agent.config import Config
from agent.contract import protocol
from agent.edge.invoke_queue import FairQueue, Limits
from agent.edge.outbox import OutboxPump
from agent.edge.replies import Answer, Replies, Target
from agent.edge.statesync import StateSync
from agent.edge.store_faults import StoreFaults
from agent.edge.uplink import Uplink
from agent.errors import (
    AgentError,
    BadRequest,
    EdgeExecutionError,
    FunctionNotFound,
    HandlerError,
    Overloaded,
    StateConflict,
    StoreError,
    error_to_dict,
)
from agent.exec.metrics import EdgeMetrics, InvocationRecord
from agent.exec.pool import InvokeResult, WorkerPool
from agent.exec.pool.direct import Started
from agent.store import ReplyRecord, StateTooLarge, Store
from agent.store.accepted import AcceptedInvoke, AcceptedInvokes

log = logging.getLogger(__name__)

#: The loop's timer (its ``timers`` table) for invocations due to go on record as accepted.
RECORD_TIMER = "record_accepted"


@dataclass
class Invocation:
    request: protocol.InvokeRequest
    #: (reply topic, MQTT 5 correlation data) of the request and of duplicates seen meanwhile.
    targets: list[Target]
    #: Incoming messages to acknowledge once the reply is in the outbox.
    acks: list[mqtt.Message]
    #: When it was accepted, on the loop's monotonic clock.
    started: float
    #: The reply committed with the invocation's state changes (to ``targets[0]``), set
    #: by the invocation thread once they are on disk.
    committed_reply: bytes | None = None
    #: Its write set applied in memory (StateSync.apply), and the reply that goes with it.
    state_ticket: int = 0
    pending_reply: bytes | None = None
    #: Its place in the fair queue was given back (its worker is free again).
    released: bool = False
    #: The request's bytes as they came (checked by ``decode_invoke``): what the worker gets.
    raw: bytes | None = None
    #: Its accepted record was tried (written, or the store failed: not tried again).
    record_tried: bool = False


@dataclass(frozen=True)
class InvokeDone:
    invocation: Invocation
    result: InvokeResult | None
    error: EdgeExecutionError | None


class Invocations:
    """Admission, dispatch and answers of invocations; built and driven by the loop."""

    def __init__(
        self,
        settings: Callable[[], Config],
        *,
        topics: protocol.Topics,
        store: Store,
        pool: WorkerPool,
        sync: StateSync,
        accepted: AcceptedInvokes,
        replies: Replies,
        uplink: Uplink,
        outbox: OutboxPump,
        faults: StoreFaults,
        metrics: EdgeMetrics,
        executor: Executor,
        threads: int,
        post: Callable[[object], None],
        clock: Callable[[], float],
        timers: dict[str, float],
        stopping: Callable[[], bool],
        watch: Callable[[int], None] | None = None,
        unwatch: Callable[[int], None] | None = None,
    ) -> None:
        self._settings = settings  # the running config (a reload replaces it)
        self._topics = topics
        self._store = store
        self._pool = pool
        self._sync = sync
        #: Accepted invokes still running after record_accepted_after_s, recorded durably
        #: (and acknowledged then) until answered.
        self._accepted = accepted
        self._replies = replies
        self._uplink = uplink
        self._outbox = outbox
        self._faults = faults
        self._metrics = metrics
        self._executor = executor
        self._threads = threads  # the executor's threads
        self._post = post
        self._clock = clock
        self._timers = timers
        self._stopping = stopping
        #: The loop's readiness poll: it waits for these fds with its other sources.
        self._watch = watch
        self._unwatch = unwatch
        #: Invocations sent to a warm worker by the loop itself (no executor thread), by
        #: the worker's result fd.
        self._direct: dict[int, tuple[Started, Invocation]] = {}
        self.inflight: dict[str, Invocation] = {}
        self.accepted_rids: set[str] = set()
        self.recovered = False
        #: Accepted invocations per function, fairly bounded and dispatched (issue 12).
        self._limits: tuple[Config, Limits] | None = None
        self.queue: FairQueue[Invocation] = FairQueue(self._queue_limits, pool.concurrency)

    # -- admission ------------------------------------------------------------------------

    def handle_invoke(self, msg: mqtt.Message) -> None:
        if self._stopping():
            return  # not acknowledged: the broker delivers it again after the restart
        config = self._settings()
        try:
            request = protocol.decode_invoke(msg.payload, config.agent.max_payload_bytes)
        except protocol.InvokeDecodeError as exc:
            log.warning("bad invoke request: %s", exc, extra={"request_id": exc.request_id})
            address = self.reply_address(msg, exc.reply_to)
            target = (address.topic, msg.correlation_data)
            self._replies.error(exc.request_id, exc.function_id, [target], exc, durable=True)
            self._uplink.ack(msg)
            return
        address = self.reply_address(msg, request.reply_to)
        target = (address.topic, msg.correlation_data)
        rid = request.request_id
        if address.refused is not None:  # never publish into the contract: not run, not kept
            log.warning("invoke %s refused: %s", rid, address.refused, extra={"request_id": rid})
            refused = BadRequest(f"invoke: reply address refused: {address.refused}")
            self._replies.error(rid, request.function_id, [target], refused, durable=True)
            self._uplink.ack(msg)
            return
        running = self.inflight.get(rid)
        if running is not None:  # a duplicate while the first is still running
            if target not in running.targets:  # one reply per address, however many copies
                running.targets.append(target)
            if rid in self.accepted_rids:
                self._uplink.ack(msg)  # the first copy is on record: it will be answered
            else:
                running.acks.append(msg)
            return
        answered = self._store.dedupe_get(rid)
        if answered is not None and answered.ts < time.time() - config.agent.dedupe_window_s:
            answered = None  # older than the window: a new request (the prune is only tidying)
        if answered is not None:  # a duplicate of an answered request: no queue room taken
            if msg.dup:
                # The broker's redelivery (our PUBACK was lost: a restart, a dropped link).
                # The reply was durable before that PUBACK, so it was delivered or is still
                # queued: a second copy would only be a second reply.
                log.info("redelivered request %s: already answered", rid, extra={"request_id": rid})
                self._uplink.ack(msg)
                return
            log.info("duplicate request %s: resending its reply", rid, extra={"request_id": rid})
            self._replies.send(
                rid, answered.reply, [target], durable=True, remember=False, drain=False
            )
            self._uplink.ack(msg)  # before the reply goes out: see handle_invoke_done
            self._outbox.drain()
            return
        if not self._pool.has_function(request.function_id):
            missing = FunctionNotFound(f"Function not found: {request.function_id}")
            self._replies.error(rid, request.function_id, [target], missing, durable=True)
            self._uplink.ack(msg)
            return
        if not self._store.outbox_has_room(config.agent.max_payload_bytes):
            full = Overloaded("the outbox is full; retry when the agent has drained it")
            self._replies.error(rid, request.function_id, [target], full, durable=False)
            self._uplink.ack(msg)
            return
        invocation = Invocation(request, [target], [msg], started=self._clock(), raw=msg.payload)
        no_room, displaced = self.queue.offer(request.function_id, invocation)
        if no_room is not None:
            busy = Overloaded(no_room)
            self._replies.error(rid, request.function_id, [target], busy, durable=False)
            self._uplink.ack(msg)
            return
        self.inflight[rid] = invocation
        for other in displaced:  # its function held more than its share: this one is owed room
            self._refuse_displaced(other)
        self._start_ready()  # before any write of its own: the worker runs meanwhile
        self._accept_later(invocation, msg)

    def refuse_on_store_fault(self, msg: mqtt.Message) -> None:
        """An invoke the store failed under before it was taken: answer overloaded now."""
        try:
            request = protocol.decode_invoke(msg.payload, self._settings().agent.max_payload_bytes)
        except protocol.InvokeDecodeError:
            self._uplink.ack(msg)
            return
        rid = request.request_id
        if rid in self.inflight:
            return  # taken: it is answered (and acknowledged) when it is done
        address = self.reply_address(msg, request.reply_to)
        busy = Overloaded(
            f"the agent's state store is failing ({self._faults.reason}); retry later"
        )
        target = (address.topic, msg.correlation_data)
        self._replies.error(rid, request.function_id, [target], busy, durable=False)
        self._uplink.ack(msg)

    def _refuse_displaced(self, invocation: Invocation) -> None:
        """A waiting invocation gave its place to another function's: answer overloaded."""
        request = invocation.request
        rid, fid = request.request_id, request.function_id
        self.inflight.pop(rid, None)
        held = self.queue.held(fid)
        busy = Overloaded(f"function {fid} holds {held} invocations, over its fair share")
        self._replies.error(rid, fid, invocation.targets, busy, durable=False)
        for msg in invocation.acks:
            self._uplink.ack(msg)
        if rid in self.accepted_rids:  # answered (overloaded): nothing to run after a restart
            self.accepted_rids.discard(rid)
            self.forget_accepted(rid)

    def _start_ready(self) -> None:
        """Start every invocation the fair queue lets start: sent to an idle warm worker
        from here when one is free (the loop then waits for its answer with its other
        sources), else handed to an executor thread (:meth:`run`)."""
        for _fid, invocation in self.queue.ready():
            if not self._start_direct(invocation):
                self._executor.submit(self.run, invocation)

    # -- running on the loop (a warm worker, no thread) -----------------------------------

    def _start_direct(self, invocation: Invocation) -> bool:
        if self._watch is None:
            return False
        request = invocation.request
        try:
            started = self._pool.try_start(
                request.function_id, (request.payload,), request.request_id, invocation.raw
            )
        except EdgeExecutionError:  # (arguments that cannot be sent) run() answers it
            return False
        if started is None:
            return False
        self._direct[started.fd] = (started, invocation)
        self._watch(started.fd)
        return True

    def waiting(self) -> int:
        """Accepted invocations not started yet (queued behind their function's
        ``concurrency``, or for a worker)."""
        return len(self.queue) - self.queue.running

    @property
    def direct_count(self) -> int:
        """Invocations whose worker's answer the loop waits for itself."""
        return len(self._direct)

    def next_direct_deadline(self) -> float | None:
        """The earliest deadline (``time.monotonic``, the pool's clock) of those, if any."""
        if not self._direct:
            return None
        return min(started.deadline for started, _ in self._direct.values())

    def worker_readable(self, fd: int) -> InvokeDone | None:
        """The loop saw ``fd`` readable: the finished invocation, once its answer is in."""
        entry = self._direct.get(fd)
        if entry is None or not entry[0].poll():
            return None
        return self._conclude_direct(fd)

    def expire_direct(self, now: float) -> list[InvokeDone]:
        """Invocations past their deadline (``now``: ``time.monotonic``): what their workers
        wrote is read first (an answer that came in time is an answer, as in
        ``Worker.recv``); the others' workers are killed (on an executor thread) and they
        are answered as timed out. The answers read here, for the loop's batch."""
        out: list[InvokeDone] = []
        for fd in [fd for fd, (s, _) in self._direct.items() if s.deadline <= now]:
            self._direct[fd][0].poll()
            done = self._conclude_direct(fd)
            if done is not None:
                out.append(done)
        return out

    def abandon_direct(self, why: str) -> None:
        """Stopping: kill the workers still running invocations for the loop, unanswered
        (unacknowledged too, unless on record: they run again after the restart)."""
        for fd in list(self._direct):
            started, _invocation = self._direct.pop(fd)
            if self._unwatch is not None:
                self._unwatch(fd)
            started.abandon(why)

    def _conclude_direct(self, fd: int) -> InvokeDone | None:
        started, invocation = self._direct.pop(fd)
        if self._unwatch is not None:
            self._unwatch(fd)
        if started.blocks:  # the worker must be killed and reaped: not on the loop
            self._executor.submit(self._finish_off_loop, started, invocation)
            return None
        started.on_loop = True
        return self._finished(invocation, started)

    def _finish_off_loop(self, started: Started, invocation: Invocation) -> None:
        """Executor thread: what :meth:`_conclude_direct` could not finish on the loop."""
        self._post(self._finished(invocation, started))

    def _finished(self, invocation: Invocation, started: Started) -> InvokeDone:
        try:
            # On the loop a worker to discard (a recycle) is killed and its uid swept on an
            # executor thread; off the loop here, before the answer, as WorkerPool.invoke.
            defer = self._executor.submit if started.on_loop else None
            result = started.finish(defer=defer)
        except EdgeExecutionError as exc:
            return InvokeDone(invocation, None, exc)
        except Exception as exc:  # a bug must still answer the caller
            log.exception("invocation %s failed unexpectedly", invocation.request.request_id)
            return InvokeDone(invocation, None, EdgeExecutionError(str(exc)))
        finally:
            if started.on_loop:
                # Its worker is free: the next waiting call starts now, and runs while
                # this one's reply is written (not after the batch's commit).
                self._release_place(invocation)
        return InvokeDone(invocation, result, None)

    def _release_place(self, invocation: Invocation) -> None:
        """Give its place in the fair queue back (once) and start what may start now."""
        if not invocation.released:
            invocation.released = True
            self.queue.finished(invocation.request.function_id)
            self._start_ready()

    def _queue_limits(self) -> Limits:
        """The fair queue's bounds from the running config (made again after a reload)."""
        config = self._settings()
        cached = self._limits
        if cached is not None and cached[0] is config:
            return cached[1]
        runtime = config.runtime
        limits = Limits(
            capacity=self._max_inflight(),
            max_queue=runtime.max_queue,
            threads=self._threads,
            per_function=runtime.max_workers,
        )
        self._limits = (config, limits)
        return limits

    def reply_address(self, msg: mqtt.Message, reply_to: str | None) -> protocol.ReplyAddress:
        mqtt_config = self._settings().mqtt
        return self._topics.reply_address(
            msg.response_topic, reply_to, mqtt_config.reply_prefixes, mqtt_config.topic_charset
        )

    def _max_inflight(self) -> int:
        """Accepted and not yet answered, at most: every invocation thread busy plus a queue."""
        runtime = self._settings().runtime
        return runtime.max_workers * 2 + runtime.max_queue

    # -- running (executor threads) -------------------------------------------------------

    def run(self, invocation: Invocation) -> None:
        """Executor thread: run it in a worker and post the outcome to the loop."""
        request = invocation.request
        try:
            result = self._pool.invoke(
                request.function_id,
                (request.payload,),
                request_id=request.request_id,
                # Read when the worker gets it, not now: it may wait for a worker first.
                context=self._sync.current,
                on_result=functools.partial(self.apply_state, invocation),
                request_json=invocation.raw,
            )
            # The worker is free again; the reply waits until the state is on disk.
            if invocation.state_ticket:
                self._sync.persist(invocation.state_ticket)
                invocation.committed_reply = invocation.pending_reply
            elif result.accepts_context:
                self._sync.persist_through(result.state_version)
        except EdgeExecutionError as exc:
            self._post(InvokeDone(invocation, None, exc))
        except Exception as exc:  # a bug must still answer the caller
            log.exception("invocation %s failed unexpectedly", request.request_id)
            self._post(InvokeDone(invocation, None, EdgeExecutionError(str(exc))))
        else:
            self._post(InvokeDone(invocation, result, None))

    def apply_state(self, invocation: Invocation, result: InvokeResult) -> None:
        """Invocation thread, worker still held: apply the write set (in memory) with its
        reply; it goes to disk once the worker is free (:meth:`StateSync.persist`).

        Applied while the worker is held, the function's next invocation (with
        ``concurrency`` 1) cannot start before it is in its context. Raises what fails the
        invocation instead (StateConflict, Overloaded, HandlerError); nothing is applied then.
        """
        if not result.changes:
            return
        request = invocation.request
        rid = request.request_id
        payload, error = self._replies.ok_reply(request, result)
        if error is not None:
            raise error
        topic, correlation = invocation.targets[0]
        try:
            invocation.state_ticket = self._sync.apply(
                result.changes,
                ReplyRecord(rid, topic, payload, time.time(), correlation),
                base_version=result.state_version,
                checked=result.checked,
                read_all=result.read_all,
            )
        except (StateTooLarge, ValueError, TypeError) as exc:
            log.warning("state changes of %s refused: %s", rid, exc, extra={"request_id": rid})
            raise HandlerError(f"state change refused: {exc}") from exc
        invocation.pending_reply = payload

    # -- answers --------------------------------------------------------------------------

    def handle_invoke_done(self, done: InvokeDone) -> None:
        self.handle_invokes_done([done])

    def handle_invokes_done(self, dones: list[InvokeDone]) -> None:
        """Answer finished invocations (a run of them from one loop wake-up): their replies,
        dedupe rows and the deletes of their accepted records in ONE transaction (group
        commit, :meth:`Replies.send_many`), then the acks, then one drain.

        Every reply is durable before the ack of its request and before it is handed to
        MQTT. When the group cannot be written (the store fails) each is answered on its
        own as before: queued alone, or published directly while the store fails.
        """
        answered: list[tuple[Answer, Invocation]] = []
        for done in dones:
            try:
                answered.append((self._answer(done), done.invocation))
            except Exception:  # one bug must not leave the others of the run unanswered
                log.exception("bug while answering %s", done.invocation.request.request_id)
        also = [
            self._accepted.done_statement(answer.rid)
            for answer, _ in answered
            if answer.rid in self.accepted_rids
        ]
        written = self._replies.send_many([answer for answer, _ in answered], also=also)
        for answer, invocation in answered:
            try:  # a failure is this invocation's alone: the rest of the run is acknowledged
                self._answered(answer, invocation, forget=not written)
            except StoreError as exc:
                if not self._faults.failed(exc, f"answering {answer.rid}"):
                    log.error("while answering %s: %s", answer.rid, exc)
            except AgentError as exc:
                log.error("while answering %s: %s", answer.rid, exc)
            except Exception:
                log.exception("bug while answering %s", answer.rid)
        self._outbox.drain()

    def _answered(self, answer: Answer, invocation: Invocation, *, forget: bool) -> None:
        """After its reply is durable: the acks, and the accepted record. ``forget``: the
        reply is not written yet (the group commit failed): queue it, and delete the record
        on its own (else it went in the replies' transaction)."""
        rid = answer.rid
        if forget and answer.targets:
            self._replies.send(
                rid, answer.payload, answer.targets, durable=True, remember=answer.remember,
                drain=False,
            )  # fmt: skip
        # Acknowledge once the reply is durable but before it is published: a broker that
        # drops the connection over the reply (a poison message) must not also redeliver
        # the request, or every reconnect would queue its reply once more.
        for msg in invocation.acks:
            self._uplink.ack(msg)
        if rid in self.accepted_rids:  # the reply is durable now: the record may go
            self.accepted_rids.discard(rid)
            if forget:
                self.forget_accepted(rid)

    def _answer(self, done: InvokeDone) -> Answer:
        """The loop's share of a finished invocation before its reply is written: the
        bookkeeping, the metrics, and the reply's bytes and targets."""
        invocation = done.invocation
        request = invocation.request
        rid, fid = request.request_id, request.function_id
        self.inflight.pop(rid, None)
        self._release_place(invocation)
        duration_ms = (self._clock() - invocation.started) * 1000
        error = done.error
        payload = b""
        if invocation.committed_reply is not None:
            payload = invocation.committed_reply  # queued and remembered with the state
        elif done.result is not None:
            payload, error = self._replies.ok_reply(request, done.result)
        self._metrics.record(
            InvocationRecord(
                function_id=fid,
                node_id=self._settings().node.id,
                start_time=time.time() - duration_ms / 1000,
                duration_ms=duration_ms,
                success=error is None,
                error="" if error is None else str(error),
                request_id=rid,
                cold_start=bool(done.result and done.result.cold_start),
                peak_rss_kb=done.result.rss_kb if done.result else 0,
                error_type=None if error is None else error_to_dict(error)["type"],
            )
        )
        if error is not None:
            log.info("%s failed: %s", fid, error, extra={"function_id": fid, "request_id": rid})
            payload = self._replies.error_payload(rid, fid, error, duration_ms)
        targets = invocation.targets
        committed = invocation.committed_reply is not None
        if committed:
            targets = targets[1:]  # the first reply went into the outbox with the state
        # Remember the reply for duplicates only when the handler's outcome is final: a
        # request refused (overloaded, not deployed yet) or in conflict must run again
        # when it is retried with the same id.
        final = error is None or not isinstance(
            error, Overloaded | FunctionNotFound | StateConflict
        )
        return Answer(rid, payload, targets, remember=final and not committed)

    # -- accepted invokes on record -------------------------------------------------------

    def _accept_later(self, invocation: Invocation, msg: mqtt.Message) -> None:
        """Put it on record as accepted (and acknowledge it) if it still runs after
        ``agent.record_accepted_after_s``; at once when that is 0.

        Brokers with an ack deadline (NATS: ``ack_wait``, 30 s by default) deliver again
        what stays unacknowledged that long, even while it runs; once it is on record here
        an agent that crashes runs it again at start (:meth:`recover_accepted`), so the
        request is answered either way. One answered before it is due is acknowledged with
        its reply and never written here: a crash before that leaves it unacknowledged, and
        the broker delivers it again (the session is persistent).
        """
        if msg.qos == 0:  # nothing to acknowledge (a recovered request is on record already)
            return
        after = self._record_after()
        if after <= 0:
            self._accept([(invocation, msg)])
            return
        if RECORD_TIMER not in self._timers:  # else it is due sooner, for an older one
            self._timers[RECORD_TIMER] = invocation.started + after

    def _record_after(self) -> float:
        return max(0.0, self._settings().agent.record_accepted_after_s)

    def _awaiting_record(self) -> Iterator[tuple[Invocation, mqtt.Message]]:
        """Accepted invocations still running, neither on record nor acknowledged, with
        the message they came in, oldest first (``inflight`` keeps acceptance order, so
        whatever the running setting the first is due first). Nothing is kept for one
        answered before it was due."""
        for invocation in self.inflight.values():
            if invocation.record_tried or not invocation.acks:
                continue
            msg = invocation.acks[0]  # the request as it came (then its duplicates)
            if msg.qos > 0 and invocation.request.request_id not in self.accepted_rids:
                yield invocation, msg

    def arm_record_timer(self) -> None:
        """Set the record timer to when the oldest invocation awaiting its record is due
        under the running setting (the loop calls this after a reload too: a lower setting
        applies to what already waits)."""
        first = next(self._awaiting_record(), None)
        if first is None:
            self._timers.pop(RECORD_TIMER, None)
        else:
            self._timers[RECORD_TIMER] = first[0].started + self._record_after()

    def record_due(self, now: float) -> None:
        """Timer: put every invocation still running ``record_accepted_after_s`` after it
        was accepted on record, in one transaction, and acknowledge them."""
        after = self._record_after()
        due: list[tuple[Invocation, mqtt.Message]] = []
        for invocation, msg in self._awaiting_record():
            if invocation.started + after > now:
                break
            due.append((invocation, msg))
        if due:
            self._accept(due)
        self.arm_record_timer()

    def _accept(self, batch: list[tuple[Invocation, mqtt.Message]]) -> None:
        """Record accepted invokes durably (one transaction), then acknowledge them to the
        broker. A record that cannot be written leaves the ack for the answer, as before."""
        for invocation, _msg in batch:
            invocation.record_tried = True
        records = [
            AcceptedInvoke(
                invocation.request.request_id,
                msg.payload,
                msg.response_topic,
                msg.correlation_data,
                time.time(),
            )
            for invocation, msg in batch
        ]
        try:
            self._accepted.put_many(records)
        except StoreError as exc:  # a failing store: degraded, and acknowledged once answered
            rids = ", ".join(record.request_id for record in records)
            if not self._faults.failed(exc, f"recording the accepted invokes {rids}"):
                log.error("cannot record accepted invokes %s: %s", rids, exc)
            return
        for invocation, _msg in batch:
            self.accepted_rids.add(invocation.request.request_id)
            for pending in invocation.acks:
                self._uplink.ack(pending)
            invocation.acks.clear()

    def forget_accepted(self, rid: str) -> None:
        try:
            self._accepted.done(rid)
        except StoreError as exc:  # it would run again after a restart: a duplicate reply
            if self._faults.failed(exc, f"clearing the accepted invoke {rid}"):
                self._faults.leave_uncleared(rid)  # cleared once the store recovers
                return
            log.error("cannot clear accepted invoke %s: %s", rid, exc, extra={"request_id": rid})

    def recover_accepted(self) -> None:
        """At the first connect: handle again what a previous run accepted and left
        unanswered (it crashed or was killed); a request already answered only loses its
        record (its reply is in the outbox)."""
        self.recovered = True
        try:
            pending = self._accepted.pending()
        except StoreError as exc:
            log.error("cannot read accepted invokes: %s", exc)
            return
        for record in pending:
            rid = record.request_id
            if rid in self.inflight:
                continue
            if self._store.dedupe_get(rid) is not None:
                self.forget_accepted(rid)
                continue
            log.info("running again %s, accepted before a restart", rid, extra={"request_id": rid})
            self.accepted_rids.add(rid)
            self.handle_invoke(
                mqtt.Message(
                    topic=self._topics.invoke,
                    payload=record.payload,
                    qos=0,
                    retain=False,
                    mid=0,
                    response_topic=record.response_topic,
                    correlation_data=record.correlation,
                )
            )
            if rid not in self.inflight:  # answered at once (not deployed, refused, ...)
                self.accepted_rids.discard(rid)
                self.forget_accepted(rid)
