"""benchmarks/eviction_sim.py, the simulation behind docs/scale.md's "LRU against the optimum":
both policies against an exhaustive search over every eviction choice on small traces
(the independent oracle), the step order it replays, and its page layouts."""
import itertools
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import eviction_sim  # noqa: E402  (pure Python: nothing to skip for)


def best_possible(trace, sizes, budget):
    """The fewest bytes any eviction choices read for `trace` (exhaustive search over victims)."""
    best = [float("inf")]

    def go(i, cache, read):
        if read >= best[0]:
            return
        if i == len(trace):
            best[0] = read
            return
        k = trace[i]
        if k in cache:
            go(i + 1, cache, read)
            return
        used = sum(sizes[c] for c in cache)
        if used + sizes[k] <= budget:
            go(i + 1, cache | {k}, read + sizes[k])
            return
        for r in range(1, len(cache) + 1):  # every set of victims that makes room
            for victims in itertools.combinations(sorted(cache), r):
                rest = cache - set(victims)
                if sum(sizes[c] for c in rest) + sizes[k] <= budget:
                    go(i + 1, rest | {k}, read + sizes[k])

    go(0, frozenset(), 0)
    return best[0]


@pytest.mark.parametrize("seed", range(6))
def test_farthest_next_use_is_optimal_for_equal_sizes(seed):
    import random

    rnd = random.Random(seed)
    keys = list("abcdef")
    trace = [rnd.choice(keys) for _ in range(14)]
    sizes = dict.fromkeys(keys, 1)
    for budget in (2, 3):
        belady = sum(eviction_sim.simulate(trace, sizes, budget, "belady"))
        lru = sum(eviction_sim.simulate(trace, sizes, budget, "lru"))
        assert belady == best_possible(trace, sizes, budget)
        assert lru >= belady


def test_cyclic_scan_lru_misses_everything_and_the_optimum_keeps_a_subset():
    keys = list(range(5))
    sizes = dict.fromkeys(keys, 1)
    trace = keys * 4
    assert sum(eviction_sim.simulate(trace, sizes, 4, "lru")) == len(trace)  # 5 items, room for 4
    opt = best_possible(trace, sizes, 4)
    assert sum(eviction_sim.simulate(trace, sizes, 4, "belady")) == opt < len(trace)


def test_unequal_sizes_are_counted_in_bytes():
    sizes = {"big": 3, "a": 1, "b": 1}
    trace = ["big", "a", "b", "big", "a"]
    read = eviction_sim.simulate(trace, sizes, 4, "lru")
    assert read == [3, 1, 0 + 1, 3, 1]  # b evicts big (LRU); big evicts a and b
    assert sum(eviction_sim.simulate(trace, sizes, 4, "belady")) >= best_possible(trace, sizes, 4)
    with pytest.raises(ValueError, match="does not fit"):
        eviction_sim.simulate(["big"], sizes, 2, "lru")


def test_step_order_forward_then_reverse_with_recomputation():
    order = eviction_sim.step_order(2)
    fwd0 = [(0, n) for n in eviction_sim.NAMES]
    fwd1 = [(1, n) for n in eviction_sim.NAMES]
    assert order == fwd0 + fwd1 + fwd1 + fwd1[::-1] + fwd0 + fwd0[::-1]
    assert eviction_sim.step_order(2, checkpointing=False) == fwd0 + fwd1 + fwd1[::-1] + fwd0[::-1]


def test_page_layouts_cover_every_byte():
    arrays = eviction_sim.layer_arrays("tiny", layers=2)
    page = 1 << 20
    for scheme in ("separate", "contiguous"):
        layout = eviction_sim.page_layout(arrays, scheme, page=page)
        pages = {pid: nbytes for pl in layout.values() for pid, nbytes in pl}
        assert sum(pages.values()) >= sum(sum(v) for v in arrays.values())
    contiguous = eviction_sim.page_layout(arrays, "contiguous", page=page)
    total = sum(sum(v) for v in arrays.values())
    assert len({pid for pl in contiguous.values() for pid, _ in pl}) == -(-total // page)
