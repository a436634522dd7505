"""What a handler sees as ``context`` in ``handler(event, context)``. Pure: the worker imports it.

``context.state`` reads the synced reported state as it was when the invocation started and
records writes; the writes go back to the agent with the result and are applied atomically
only if the invocation succeeded (a raise, a timeout or a crash applies nothing).
``context.desired`` is the cloud's desired state, read-only.

Consistency: the state an invocation reads is taken when it starts executing (when the agent
hands it to its worker), and every write committed before that is in it. Its write set is
committed with an optimistic check: if another invocation changed a key this one read or
wrote since its snapshot, nothing is written and it fails with ``conflict`` (it is never
re-run behind the caller's back). :class:`StateView` records what was read for that check;
listing the keys (``keys``, iteration, ``to_dict``) reads the whole document.
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
        #: Keys read from the snapshot (not from this invocation's own writes).
        self.reads: set[str] = set()
        #: The key set was listed: any change to the document conflicts.
        self.read_all = False

    def get(self, key: str, default: Any = None) -> Any:
        """A copy of the value (mutating it changes nothing: call ``set``)."""
        if key in self.writes:
            value = self.writes[key]
            return default if value is None else copy.deepcopy(value)
        self.reads.add(key)
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
        if isinstance(key, str):
            self.reads.add(key)
        return key in self._data

    def keys(self) -> list[str]:
        self.read_all = True
        return sorted(
            k
            for k in {*self._data, *self.writes}
            if (self.writes[k] is not None if k in self.writes else k in self._data)
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def to_dict(self) -> dict[str, Any]:
        """A copy of the whole document as this invocation sees it."""
        return {key: self.get(key) for key in self.keys()}

    def check_set(self) -> tuple[list[str], bool]:
        """(keys read or written, whether the whole document was read): the commit's check."""
        return sorted(self.reads | self.writes.keys()), self.read_all


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
