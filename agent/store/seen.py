"""The request ids the dedupe table may hold, in memory: a negative filter in front of it.

Owns :class:`SeenFilter`, a Bloom filter of request ids split into generations by the
``ts`` of their dedupe row (``bucket_s`` seconds each), so that
:meth:`~agent.store.dedupe.Dedupe.get` answers a request id that was certainly never
remembered without a query (nearly every request id is new). "Maybe" sends the caller to
SQLite as before. A generation (``2 ** bits_log2`` bits, 128 KiB by default) is allocated
at the first id added to it, and dropped by :meth:`SeenFilter.forget_before` once the
prune has deleted every row it could stand for. No SQL here: :mod:`agent.store.dedupe`
feeds it at every write of a dedupe row and fills it from the table at open.

Must never: answer "not there" for a request id that may be in the dedupe table (a false
negative runs a duplicate request twice; a false positive only costs the query), drop a
generation that may still stand for a row, or grow without bound (at most
``max_generations`` generations: beyond that the oldest is merged into the next).

Concurrency: every mutation happens with the database's lock held (the dedupe part's
writes). :meth:`SeenFilter.might_contain` runs without it, on the daemon's loop thread,
and is safe because:

- bits are only ever set, never cleared, in a generation readers can see (a merge ORs a
  whole generation into another in one C call, under the GIL), and an id's bits are set
  before the transaction that writes its row commits (the writer holds the lock through
  both): a reader that starts after the commit sees them; a reader racing the write at
  worst misses an id whose row is not committed yet, which SQL would not return either;
- readers see the generations through one tuple, replaced whole (never changed in place)
  when a generation is created, merged (its bits are OR-ed into the survivor before the
  tuple without it is published), dropped (only after the prune's DELETE committed: its
  rows are gone) or the filter is replaced or disabled: the reader works on one snapshot;
- a disabled filter (the store is closed, or not loaded yet) is ``None``: every id
  "might" be there, so the caller queries SQLite as it always did.

The bit positions come from Python's ``hash()`` of the request id: SipHash with a key
chosen at random per process, so a publisher cannot aim request ids at one set of bits
(at worst it raises the false-positive rate, which only costs queries); the filter is
refilled from the table at every open, so a new key per process is harmless.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["SeenFilter"]

_MASK64 = (1 << 64) - 1
#: An odd 64-bit constant (2**64 / golden ratio): multiplying by it is a bijection of the
#: low 64 bits that spreads every input bit upwards, so the three slices of a 32-bit
#: ``hash()`` (32-bit builds) still differ; with a 64-bit SipHash it changes nothing.
_SPREAD = 0x9E3779B97F4A7C15
#: The generation of a row whose ``ts`` is not a finite number: never dropped (a prune never
#: deletes a row with ts = +inf; -inf would go, but keeping it is only a false positive).
#: Above the bucket of any finite float, so it is the newest: never merged into another.
_FOREVER = 1 << 1100


class SeenFilter:
    """A Bloom filter of request ids (k = 3) in generations by the ``ts`` of their row.

    ``bucket_s`` seconds of ``ts`` per generation; ``bits_log2``: each generation holds
    ``2 ** bits_log2`` bits (at most 21: three slices of a 64-bit hash);
    ``max_generations``: the memory bound (see :meth:`add`).
    """

    def __init__(
        self, *, bucket_s: int = 60, bits_log2: int = 20, max_generations: int = 16
    ) -> None:
        if not isinstance(bucket_s, int) or bucket_s < 1:
            raise ValueError(f"bucket_s must be a positive whole number, got {bucket_s!r}")
        if not 3 <= bits_log2 <= 21:
            raise ValueError(f"bits_log2 must be within 3..21, got {bits_log2}")
        if max_generations < 2:
            raise ValueError(f"max_generations must be 2 or more, got {max_generations}")
        self.bucket_s = bucket_s
        self.max_generations = max_generations
        self._shift = bits_log2
        self._slice = (1 << bits_log2) - 1
        self._nbytes = (1 << bits_log2) // 8
        #: Generation key -> its bits. The key is the bucket (``int(ts // bucket_s)``) of
        #: the newest ts it may stand for: every row it stands for has ts below
        #: ``(key + 1) * bucket_s``. Written with the lock held; readers use ``_bits``.
        self._gens: dict[int, bytearray] = {}
        self._enabled = True
        #: What readers see: the generations, newest first; None = disabled (all "maybe").
        self._bits: tuple[bytearray, ...] | None = ()

    # -- reading (any thread, no lock) -----------------------------------------------------

    def might_contain(self, request_id: str) -> bool:
        """False only if ``request_id`` was certainly never added since the last fill (or
        only to generations dropped since); True when it may have been."""
        gens = self._bits  # one snapshot (see the module docstring)
        if gens is None:
            return True
        if not gens:
            return False
        h = (hash(request_id) * _SPREAD) & _MASK64
        shift, mask = self._shift, self._slice
        a = h & mask
        b = (h >> shift) & mask
        c = (h >> (2 * shift)) & mask
        ia, ma = a >> 3, 1 << (a & 7)
        ib, mb = b >> 3, 1 << (b & 7)
        ic, mc = c >> 3, 1 << (c & 7)
        # A plain loop: any() over a generator costs ~40% more on this hot path.
        for bits in gens:  # noqa: SIM110
            if bits[ia] & ma and bits[ib] & mb and bits[ic] & mc:
                return True
        return False

    @property
    def enabled(self) -> bool:
        """False while disabled (:meth:`disable`): every id "might" be there."""
        return self._bits is not None

    def generations(self) -> list[int]:
        """The keys of the allocated generations, oldest first (for tests and status)."""
        return sorted(self._gens)

    @property
    def nbytes(self) -> int:
        """Bytes of bits allocated."""
        return len(self._gens) * self._nbytes

    # -- writing (the database's lock held) ------------------------------------------------

    def add(self, request_id: str, ts: float) -> None:
        """Remember ``request_id``, whose dedupe row has ``ts``: call it before the row's
        transaction commits, the lock held.

        At ``max_generations``, an id older than the newest generation goes into the next
        newer one (dropped later than its own would have been: only a false positive for
        longer), and a newer one first merges the oldest two.
        """
        if not self._enabled:
            return  # the store is closed: the next replace() reads the table anyway
        try:
            key = int(ts // self.bucket_s)
        except (OverflowError, ValueError):  # inf or nan: kept until the filter is refilled
            key = _FOREVER
        bits = self._gens.get(key)
        if bits is None:
            bits = self._generation_for(key)
        h = (hash(request_id) * _SPREAD) & _MASK64
        shift, mask = self._shift, self._slice
        pos = h & mask
        bits[pos >> 3] |= 1 << (pos & 7)
        pos = (h >> shift) & mask
        bits[pos >> 3] |= 1 << (pos & 7)
        pos = (h >> (2 * shift)) & mask
        bits[pos >> 3] |= 1 << (pos & 7)

    def forget_before(self, older_than_ts: float) -> None:
        """The prune deleted every row with ts below ``older_than_ts`` (and committed):
        drop every generation that stands only for such rows. The lock held."""
        bucket_s = self.bucket_s
        drop = [
            key for key in self._gens if key != _FOREVER and (key + 1) * bucket_s <= older_than_ts
        ]
        if drop:
            for key in drop:
                del self._gens[key]
            self._publish()

    def replace(self, rows: Iterable[tuple[str, float]]) -> None:
        """Forget everything and hold exactly ``rows`` (request id, ts): the table at open.
        Readers keep the previous contents (or "maybe", when disabled) until it is done."""
        fresh = SeenFilter(
            bucket_s=self.bucket_s, bits_log2=self._shift, max_generations=self.max_generations
        )
        add = fresh.add
        for request_id, ts in rows:
            add(request_id, ts)
        self._gens = fresh._gens
        self._enabled = True
        self._publish()

    def clear(self) -> None:
        """Forget every id (the table is empty); enables a disabled filter."""
        self.replace(())

    def disable(self) -> None:
        """Free the bits; every id "might" be there until :meth:`replace` (the store is
        closed, or not loaded yet)."""
        self._enabled = False
        self._gens = {}
        self._bits = None

    def _generation_for(self, key: int) -> bytearray:
        if len(self._gens) >= self.max_generations:
            later = [k for k in self._gens if k > key]
            if later:
                return self._gens[min(later)]
            self._merge_oldest()
        bits = bytearray(self._nbytes)
        self._gens[key] = bits
        self._publish()
        return bits

    def _merge_oldest(self) -> None:
        """OR the oldest generation into the next (which then also stands for its rows:
        it is dropped later), then stop publishing it."""
        oldest, into = sorted(self._gens)[:2]
        old, bits = self._gens[oldest], self._gens[into]
        merged = int.from_bytes(bits, "little") | int.from_bytes(old, "little")
        bits[:] = merged.to_bytes(self._nbytes, "little")  # same length: set in place
        del self._gens[oldest]
        self._publish()

    def _publish(self) -> None:
        if not self._enabled:
            return  # stays "maybe" until replace()
        self._bits = tuple(self._gens[key] for key in sorted(self._gens, reverse=True))
