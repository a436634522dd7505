"""The optimistic check that keeps handler state from losing updates. Pure.

An invocation reads the synced state as of the version it started from (its snapshot) and
sends back its write set with the keys it read or wrote. Its commit is accepted only if
none of those keys changed after the snapshot; otherwise it fails with ``conflict`` and
writes nothing. This is backward validation as in optimistic concurrency control: the
accepted commits are equivalent to running the invocations one after another in commit
order, and no write is ever lost silently.

:class:`ChangeVersions` remembers, per key, the version of the last commit that changed it
(deletions included). It is kept in memory next to the state: snapshots never outlive the
process that handed them out, so nothing older than the process needs checking. Its size
is bounded: when remembered deletions pile up they are forgotten and ``floor`` rises; a
snapshot older than ``floor`` can no longer be checked key by key and conflicts whenever
anything it depends on may have changed.
"""

from __future__ import annotations

from collections.abc import Iterable

#: ``keys`` of a conflict on a handler that read the whole document.
WHOLE_DOCUMENT = "*"
#: Remembered keys beyond the live ones before deletions are forgotten.
_SLACK = 1024


class ChangeVersions:
    def __init__(self, floor: int = 0) -> None:
        #: Changes at or below this version are not remembered key by key.
        self.floor = floor
        #: The version of the newest commit that changed anything.
        self.last_change = floor
        self._by_key: dict[str, int] = {}

    def record(self, version: int, keys: Iterable[str], live_keys: int) -> None:
        """Commit ``version`` changed ``keys``; ``live_keys`` is the document's size after."""
        changed = False
        for key in keys:
            self._by_key[key] = version
            changed = True
        if changed:
            self.last_change = version
        if len(self._by_key) > 2 * live_keys + _SLACK:
            # Forget everything; whatever is older than now is checked conservatively.
            self.floor = max(self.floor, max(self._by_key.values()))
            self._by_key.clear()

    def conflicts(self, base_version: int, keys: Iterable[str], read_all: bool) -> list[str]:
        """The keys (or ``["*"]``) changed after ``base_version``; empty when it may commit."""
        if read_all:
            return [WHOLE_DOCUMENT] if self.last_change > base_version else []
        if base_version < self.floor:
            # Which keys changed between the snapshot and the floor is forgotten.
            return sorted(set(keys)) if self.last_change > base_version else []
        return sorted(k for k in set(keys) if self._by_key.get(k, 0) > base_version)


def conflict_message(keys: list[str], base_version: int) -> str:
    what = "the state document" if keys == [WHOLE_DOCUMENT] else f"state keys {keys}"
    return (
        f"{what} changed after this invocation read version {base_version}; none of its "
        f"writes were applied; it may be retried"
    )
