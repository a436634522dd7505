"""Memory of a function's whole process tree, where no cgroup can bound it: a sampler.

RLIMIT_DATA bounds each process on its own; a function that forks four children, maps
shared memory or starts other interpreters could use several times its ``memory_mb``. With
a uid per function, "every process of the function" is every process of its uid, so one
/proc scan per interval sums them: resident anonymous memory plus resident shared memory
(shared anonymous mappings and mapped memfds, ``RssShmem``), minus the idle footprint of
each live worker (the interpreter itself is not the function's budget). When the sum is over
``memory_mb``, the session holding the most memory is killed (a worker with its group, or an
escapee's session) and its invocation fails with ``memory_exceeded``; the next scan checks
again. This is the ``rlimit+sampled`` mechanism; a kernel-enforced ``cgroup`` one (a
delegated cgroup v2 subtree: memory.max, pids.max, cgroup.kill) would replace it where
available, through the same :class:`TreeSampler` seam, and is not written: these machines
have cgroup v1 with the memory controller not delegated, so it could not be tested.

What can slip past: anything allocated and freed between two scans (``interval_s``, 0.25 s
by default); memfd or shmem pages that no process maps (only RLIMIT_FSIZE bounds a memfd);
shared pages mapped by several of its processes count once per process (conservative).

Part of the pool package (the only place that signals processes). Never blocks the pool's
lock while scanning.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.exec.pool.process import proc_statuses, status_field

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.25


@dataclass
class Watched:
    """One function under watch: its uid, its budget and its live workers' footprint."""

    function_id: str
    uid: int
    limit_kb: int


@dataclass
class Usage:
    """A function's processes at one scan: kB per session, and the total."""

    total_kb: int = 0
    sessions: dict[int, int] = field(default_factory=dict)
    processes: int = 0


#: (function_id, session id that was killed, its kB, the function's total kB, limit kB)
OnExceeded = Callable[[Watched, int, int, int], None]
#: uid -> {worker pid (= its session): idle footprint in kB}, from the pool.
Baselines = Callable[[int], dict[int, int]]


class TreeSampler:
    """A thread that scans /proc every ``interval_s`` for the watched uids. ``start()``."""

    mode = "rlimit+sampled"

    def __init__(
        self,
        on_exceeded: OnExceeded,
        baselines: Baselines,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.on_exceeded = on_exceeded
        self.baselines = baselines
        self.interval_s = interval_s
        self._watched: dict[int, Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Scans done and CPU seconds they took (the benchmark reads these).
        self.scans = 0
        self.cpu_s = 0.0

    def watch(self, function_id: str, uid: int, memory_mb: int) -> None:
        with self._lock:
            self._watched[uid] = Watched(function_id, uid, memory_mb * 1024)

    def unwatch(self, uid: int) -> None:
        with self._lock:
            self._watched.pop(uid, None)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edge-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.interval_s
            if next_at < time.monotonic():  # fell behind (a stopped VM): do not catch up
                next_at = time.monotonic() + self.interval_s
            try:
                self.scan_once()
            except Exception:  # the sampler must outlive a bug in one scan
                log.exception("memory sampler scan failed")

    def scan_once(self) -> dict[int, Usage]:
        """One scan: every watched uid's usage; acts on those over budget."""
        with self._lock:
            watched = dict(self._watched)
        if not watched:
            return {}
        started = time.thread_time()
        usage = scan(set(watched))
        for uid, seen in usage.items():
            item = watched[uid]
            baselines = self.baselines(uid)
            for session, footprint in baselines.items():
                if session in seen.sessions:
                    held = seen.sessions[session]
                    seen.sessions[session] = max(0, held - footprint)
                    seen.total_kb -= min(held, footprint)
            if seen.total_kb > item.limit_kb:
                session, held = max(seen.sessions.items(), key=lambda kv: kv[1])
                self.on_exceeded(item, session, held, seen.total_kb)
        self.scans += 1
        self.cpu_s += time.thread_time() - started
        return usage


def scan(uids: set[int]) -> dict[int, Usage]:
    """Resident anonymous + shared memory (kB) per session of every process of ``uids``.

    One read of /proc/<pid>/status per process (its real uid, session and RSS are all
    there), and only the uid is parsed for processes of other users.
    """
    out: dict[int, Usage] = {}
    for _, text in proc_statuses():
        try:
            uid = status_field(text, b"\nUid:")
            if uid not in uids:
                continue
            session = status_field(text, b"\nNSsid:")
            kb = status_field(text, b"\nRssAnon:") + status_field(text, b"\nRssShmem:")
        except ValueError:
            continue  # a kernel thread (no RSS lines)
        seen = out.setdefault(uid, Usage())
        seen.total_kb += kb
        seen.processes += 1
        seen.sessions[session] = seen.sessions.get(session, 0) + kb
    return out
