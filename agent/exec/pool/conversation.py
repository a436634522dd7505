"""One invocation's exchange with its worker: the arguments out, the answer (or the error
it means) back.

Called by ``WorkerPool.invoke`` on the calling thread with a worker it holds: sends the
invoke frame (with the context documents the worker has not seen yet), waits for the
result up to the invocation's deadline (then kills the worker), and turns what came back
into a value or an :class:`~agent.errors.EdgeExecutionError`.

Never call user code here (results are only unpickled), and never touch the pool's
allocation state: the caller releases the worker.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import pickle
import threading
from collections.abc import Mapping
from typing import Any, cast

from agent.errors import (
    BadRequest,
    EdgeExecutionError,
    FunctionTimeout,
    HandlerError,
    WorkerCrashed,
)
from agent.exec import pipe
from agent.exec.pool.config import EMPTY_CONTEXT, ContextSource, FunctionConfig
from agent.exec.pool.process import Worker, _Deadline


def dumps_arguments(function_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    try:
        return pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    try:
        import cloudpickle

        return bytes(cloudpickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL))
    except Exception as exc:
        raise BadRequest(f"arguments for {function_id} cannot be sent to a worker: {exc}") from exc


def send_with_context(
    worker: Worker,
    request_id: str,
    deadline: float,
    blob: bytes,
    context: ContextSource,
    request_json: bool = False,
) -> int:
    """Send an invoke with the context as of now; the state version it carries."""
    ctx = (context() if callable(context) else context) or EMPTY_CONTEXT
    header = pipe.invoke(request_id, deadline)
    if request_json:
        header["request_json"] = True
    if worker.sent_state_version != ctx.state_version:
        header["state"] = dict(ctx.state)
        header["state_version"] = ctx.state_version
    if worker.sent_desired_version != ctx.desired_version:
        header["desired"] = dict(ctx.desired)
        header["desired_version"] = ctx.desired_version
    worker.send(header, blob)
    worker.sent_state_version = ctx.state_version
    worker.sent_desired_version = ctx.desired_version
    return ctx.state_version


def await_result(
    worker: Worker, config: FunctionConfig, deadline: float
) -> tuple[pipe.ResultMsg, bytes]:
    """The worker's answer, or the error its death or the deadline means (worker killed)."""
    try:
        header, blob = worker.recv(deadline)
    except _Deadline:
        raise timed_out(worker, config) from None
    except pipe.FrameError as exc:
        raise broken(worker, config, exc) from None
    return checked_result(worker, config, header, blob)


def timed_out(worker: Worker, config: FunctionConfig) -> FunctionTimeout:
    """Kill a worker at its invocation's deadline; the error to raise."""
    worker.kill("the pool at the deadline")
    return FunctionTimeout(
        f"function {config.function_id} timed out after {config.timeout_s:g}s; "
        f"its worker (pid {worker.pid}) was killed"
    )


def broken(worker: Worker, config: FunctionConfig, exc: pipe.FrameError) -> EdgeExecutionError:
    """A worker whose pipe closed or carried something that is not a frame: killed and
    reaped; the error its end means."""
    if exc.eof:
        worker.kill_closed()
    else:
        worker.kill("the pool (it broke the pipe protocol)")
    if worker.killed_for is not None:
        return worker.killed_for
    if exc.eof:
        return worker.death_error(config.function_id)
    if isinstance(exc, pipe.FrameTooLarge):
        return HandlerError(
            f"function {config.function_id} sent a result of {exc.size} bytes, over "
            f"the limit of {exc.limit}; its worker (pid {worker.pid}) was killed"
        )
    return WorkerCrashed(f"worker of {config.function_id} broke protocol: {exc}")


def checked_result(
    worker: Worker, config: FunctionConfig, header: Mapping[str, Any], blob: bytes
) -> tuple[pipe.ResultMsg, bytes]:
    """A frame that must be a ``result``; anything else kills the worker (WorkerCrashed)."""
    if header.get("op") != pipe.RESULT:
        worker.kill("the pool (it broke the pipe protocol)")
        raise WorkerCrashed(
            f"worker of {config.function_id} broke protocol: it sent {header.get('op')!r} "
            f"instead of {pipe.RESULT!r}"
        )
    return cast("pipe.ResultMsg", header), blob


def result_value(codec: str, function_id: str, header: pipe.ResultMsg, blob: bytes) -> Any:
    """The result's value. JSON codec: the worker's bytes must be exactly one JSON value in
    strict UTF-8 without NaN, Infinity or a number out of float range (what the reply may
    carry: the daemon frames these very bytes into it), else HandlerError."""
    if codec == "json":
        return result_json(function_id, blob)[0]
    try:
        return _loads(blob)
    except Exception as exc:
        raise _cannot_load(function_id, exc) from exc


def result_json(function_id: str, blob: bytes) -> tuple[Any, bytes | None]:
    """The JSON codec's :func:`result_value`, and the bytes the reply may frame as they are:
    ``blob``, or None when an object in it repeats a key (``{1: "a", "1": "b"}`` dumps so;
    a hostile worker may write it): the reply then encodes the value (one key each, the
    last wins, as before), never a duplicate key that readers resolve differently."""
    _repeats.seen = False
    try:
        text = blob.decode("utf-8")
        if text.startswith("\ufeff"):  # what json.loads says (its decoder does not check)
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        value = _RESULT_DECODER.decode(text)
    except Exception as exc:
        raise _cannot_load(function_id, exc) from exc
    return value, (None if _repeats.seen else blob)


def _cannot_load(function_id: str, exc: Exception) -> HandlerError:
    return HandlerError(
        f"Edge function failed: {function_id} returned a value this process cannot "
        f"load: {type(exc).__name__}: {exc}"
    )


def handler_error(codec: str, error: Mapping[str, Any], blob: bytes) -> EdgeExecutionError:
    name = str(error.get("exc_name", "Exception"))
    message = str(error.get("message", ""))
    exc = HandlerError(f"Edge function failed: {name}: {message}")
    exc.remote_traceback = str(error.get("traceback", ""))  # type: ignore[attr-defined]
    cause: BaseException | None = None
    if blob and codec == "pickle":
        with contextlib.suppress(Exception):
            loaded = pickle.loads(blob)
            if isinstance(loaded, BaseException):
                cause = loaded
    if cause is None and error.get("exc_module") == "builtins":
        cls = getattr(builtins, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            with contextlib.suppress(Exception):
                cause = cls(message)
    exc.__cause__ = cause
    return exc


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a float")
    return value


#: Whether the decode running on this thread met an object with a repeated key (the loop
#: and executor threads decode results at the same time).
_repeats = threading.local()


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        _repeats.seen = True
    return obj


#: Built once (``json.loads`` with options builds a decoder, and its scanner, per call).
_RESULT_DECODER = json.JSONDecoder(
    parse_constant=_not_json, parse_float=_finite_float, object_pairs_hook=_pairs
)


def _loads(blob: bytes) -> Any:
    return pickle.loads(blob) if blob else None
