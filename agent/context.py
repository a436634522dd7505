"""What a handler sees as ``context`` in ``handler(event, context)``. Pure: the worker imports it.

``context.state`` reads the synced reported state as it was when the invocation started and
records writes; the writes go back to the agent with the result and are applied atomically
only if the invocation succeeded (a raise, a timeout or a crash applies nothing).
``context.desired`` is the cloud's desired state, read-only.

Concurrency: invocations running at the same time each see the state as of their start and
their write sets are applied in the order they finish (last writer wins per key). There are
no transactions across invocations.
"""

from __future__ import annotations

import copy
import json
import time
from types import MappingProxyType

TYPE_CHECKING = False  # the worker imports this module: no typing at run time
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from typing import Any


class StateView:
    """The reported state during one invocation: reads see this invocation's own writes."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data
        self.writes: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        """A copy of the value (mutating it changes nothing: call ``set``)."""
        if key in self.writes:
            value = self.writes[key]
            return default if value is None else copy.deepcopy(value)
        return copy.deepcopy(self._data[key]) if key in self._data else default

    def set(self, key: str, value: Any) -> None:
        """Write ``value`` (any JSON value; ``None`` deletes, as ``null`` does on the wire)."""
        try:
            if not isinstance(key, str) or not key:
                raise TypeError(f"state keys are non-empty strings, got {key!r}")
            key.encode()  # a lone surrogate has no UTF-8 form: the wire could not carry it
            if value is not None:
                json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
        except (ValueError, UnicodeEncodeError) as exc:
            raise TypeError(f"state value for {key!r} is not UTF-8 JSON: {exc}") from exc
        if value is not None:
            value = copy.deepcopy(value)
        self.writes[key] = value

    def delete(self, key: str) -> None:
        self.set(key, None)

    def __contains__(self, key: object) -> bool:
        if key in self.writes:
            return self.writes[key] is not None
        return key in self._data

    def keys(self) -> list[str]:
        return sorted(k for k in {*self._data, *self.writes} if k in self)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def to_dict(self) -> dict[str, Any]:
        """A copy of the whole document as this invocation sees it."""
        return {key: self.get(key) for key in self.keys()}


class InvocationContext:
    """The second argument of ``handler(event, context)``."""

    def __init__(
        self,
        *,
        function_id: str,
        request_id: str,
        deadline: float,
        state: Mapping[str, Any],
        state_version: int,
        desired: Mapping[str, Any],
        desired_version: int,
    ) -> None:
        self.function_id = function_id
        self.request_id = request_id
        self.state = StateView(state)
        self.state_version = state_version
        self.desired: Mapping[str, Any] = MappingProxyType(copy.deepcopy(dict(desired)))
        self.desired_version = desired_version
        self._deadline = deadline  # CLOCK_MONOTONIC, system-wide on Linux: the agent's clock

    def remaining_ms(self) -> float:
        """Milliseconds left before the agent kills this invocation."""
        return max(0.0, (self._deadline - time.monotonic()) * 1000)
