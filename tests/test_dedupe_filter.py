"""The in-memory filter in front of the dedupe table (agent/store/seen.py): never a false
negative, a bounded false-positive rate, generations dropped only once the prune deleted
their rows."""

from __future__ import annotations

import math
import random

import pytest

from agent.store.seen import SeenFilter

TS = 28_333_333 * 60.0  # a wall-clock ts (Nov 2023) on a bucket boundary
GEN_BYTES = (1 << 20) // 8


def new_ids(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(128):032x}" for _ in range(n)]


# -- the filter alone ----------------------------------------------------------------------


def test_nothing_is_allocated_before_the_first_add() -> None:
    seen = SeenFilter()
    assert seen.generations() == [] and seen.nbytes == 0
    assert not seen.might_contain("r1")
    seen.add("r1", TS + 5)
    assert seen.generations() == [int(TS // 60)] and seen.nbytes == GEN_BYTES
    assert seen.might_contain("r1")


@pytest.mark.parametrize("max_generations", [16, 4])
def test_no_false_negatives_across_many_generations(max_generations: int) -> None:
    """200k ids over 40 generations (ts one minute apart); with a bound of 4 generations
    the older ones are merged into newer ones and must stay found all the same."""
    seen = SeenFilter(max_generations=max_generations)
    ids = new_ids(200_000, seed=1)
    rng = random.Random(2)
    stamped = [(rid, TS + rng.uniform(0, 40 * 60)) for rid in ids]
    for rid, ts in stamped:
        seen.add(rid, ts)
    assert len(seen.generations()) <= max_generations
    assert all(seen.might_contain(rid) for rid in ids)
    # ...and once the oldest ten minutes are pruned, every younger id is still there.
    cut = TS + 10 * 60
    seen.forget_before(cut)
    assert all(seen.might_contain(rid) for rid, ts in stamped if ts >= cut)


def test_false_positive_rate_at_60k_ids_per_generation() -> None:
    """k = 3, m = 2**20 bits, n = 60k: theory (1 - e**(-kn/m))**k = 0.39% per generation;
    the agent's default window (600 s, pruned every 60 s) keeps up to 11 generations:
    1 - (1 - 0.0039)**11 = 4.2% of new ids then still take the query."""
    seen = SeenFilter()
    for rid in new_ids(60_000, seed=3):
        seen.add(rid, TS)
    probes = new_ids(200_000, seed=4)
    one = sum(map(seen.might_contain, probes)) / len(probes)
    for g in range(1, 11):
        for rid in new_ids(60_000, seed=100 + g):
            seen.add(rid, TS + g * 60)
    assert len(seen.generations()) == 11
    eleven = sum(map(seen.might_contain, probes)) / len(probes)
    print(f"false positives at 60k ids per generation: {one:.3%} (1), {eleven:.2%} (11)")
    assert one < 0.006
    assert eleven < 0.055


def test_forget_before_drops_only_generations_entirely_older_than_the_cut() -> None:
    seen = SeenFilter()
    g0 = int(TS // 60)
    last = {g: f"last-{g}" for g in range(10)}
    for g in range(10):  # ten generations; in each, an id at its first and at its last ts
        seen.add(f"first-{g}", TS + g * 60)
        seen.add(last[g], TS + g * 60 + 59.999)
    assert seen.generations() == [g0 + g for g in range(10)]
    seen.forget_before(TS + 5 * 60 - 0.001)  # generation 4 still holds a row at or above it
    assert seen.generations() == [g0 + g for g in range(4, 10)]
    seen.forget_before(TS + 5 * 60)  # now every ts in generation 4 is below the cut
    assert seen.generations() == [g0 + g for g in range(5, 10)]
    assert all(seen.might_contain(last[g]) for g in range(5, 10))
    assert all(seen.might_contain(f"first-{g}") for g in range(5, 10))


def test_a_bucket_boundary_ts_belongs_to_the_later_generation() -> None:
    """The drop rule relies on every ts of generation g being below (g + 1) * bucket_s."""
    seen = SeenFilter()
    edge = TS + 60
    seen.add("below", math.nextafter(edge, 0.0))  # the float just below the boundary
    seen.add("at", edge)
    g0 = int(TS // 60)
    assert seen.generations() == [g0, g0 + 1]
    seen.forget_before(edge)  # the prune deletes "below" (ts < edge) and keeps "at"
    assert seen.generations() == [g0 + 1]
    assert seen.might_contain("at")


def test_the_memory_bound_merges_and_never_loses_an_id() -> None:
    seen = SeenFilter(max_generations=4)
    stamped = [(f"r{i}", TS + i * 60.0) for i in range(20)]
    for rid, ts in stamped:
        seen.add(rid, ts)
    assert len(seen.generations()) == 4 and seen.nbytes == 4 * GEN_BYTES
    seen.add("late", TS + 60.0)  # older than every generation: into the oldest newer one
    assert len(seen.generations()) == 4
    assert all(seen.might_contain(rid) for rid, _ in stamped) and seen.might_contain("late")
    for cut in (TS + 17 * 60, TS + 18 * 60, TS + 19 * 60):
        seen.forget_before(cut)
        assert all(seen.might_contain(rid) for rid, ts in stamped if ts >= cut)


def test_a_ts_that_is_not_a_finite_number_is_kept() -> None:
    seen = SeenFilter()
    seen.add("forever", float("inf"))
    seen.add("nan", float("nan"))
    seen.add("huge", 1e300)
    for cut in (TS, 1e300, float("inf")):  # DELETE ... WHERE ts < cut keeps ts = inf
        seen.forget_before(cut)
        assert seen.might_contain("forever") and seen.might_contain("nan")


def test_disabled_means_maybe_and_replace_starts_from_the_rows() -> None:
    seen = SeenFilter()
    seen.add("r1", TS)
    seen.disable()
    assert not seen.enabled and seen.nbytes == 0
    assert seen.might_contain("anything")
    seen.add("r2", TS)  # the store is closed: ignored, the next fill reads the table
    assert seen.nbytes == 0
    seen.replace([("r3", TS), ("r4", TS + 600)])
    assert seen.enabled and seen.might_contain("r3") and seen.might_contain("r4")
    assert len(seen.generations()) == 2
    seen.clear()
    assert seen.generations() == [] and not seen.might_contain("r3")
