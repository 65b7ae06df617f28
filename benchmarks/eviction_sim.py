"""Bytes a paged 4-bit base reads from disk per QLoRA step under LRU and under
farthest-next-use eviction (Belady's rule), simulated on the order in which a
training step touches the layers (issue 23: "an order-aware policy beats LRU for
a cyclic scan -- measure both").

The pager (``pq.Pager``) evicts least-recently-used pages; the base's prefetch
thread touches the next layers just before they run, so what is about to be used
is the most recent, never the victim. Whether another policy would read less
depends on the access order. With gradient checkpointing a step is not a cyclic
scan: the forward runs the decoder blocks in order, then the backward walks them
in reverse, recomputing each block's forward just before its backward. LRU loses
to the optimum only where the order turns around. This script replays that order
at layer granularity (a layer's codes and scales are read whole) for the shapes
of ``bench_scale.py`` and a budget, and counts the bytes read in steady state
(and in the first step, from an empty or a load-filled cache):

    python benchmarks/eviction_sim.py --shape 65b --budget 8G
    python benchmarks/eviction_sim.py --shape 7b --budget 0.5x --cyclic

``--cyclic`` also replays a pure cyclic scan (forward only, every step), the
case where LRU is worst. Farthest-next-use is optimal for pages of equal size
and a strong heuristic for unequal ones (the exact optimum is NP-hard there);
``tests/test_eviction_sim.py`` checks both policies against an exhaustive search
on small traces.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_scale import SHAPES, nf4_bytes, parse_size  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
NAMES = ("q", "k", "v", "o", "gate", "up", "down")  # forward order inside a decoder block


def layer_sizes(shape, layers=None):
    """Bytes of each linear layer's NF4 + DQ storage, keyed (block, name), and the block count."""
    hidden, inter, n_layers, heads, kv, _ = SHAPES[shape]
    n_layers = layers or n_layers
    kv_dim = kv * (hidden // heads)
    dims = {"q": (hidden, hidden), "k": (kv_dim, hidden), "v": (kv_dim, hidden), "o": (hidden, hidden),
            "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    return {(b, n): nf4_bytes(*dims[n]) for b in range(n_layers) for n in NAMES}, n_layers


def layer_arrays(shape, layers=None, blocksize=64, nested_blocksize=256):
    """Bytes of the three paged arrays of each layer: packed codes, 8-bit scales, nested float32 scales."""
    hidden, inter, n_layers, heads, kv, _ = SHAPES[shape]
    n_layers = layers or n_layers
    kv_dim = kv * (hidden // heads)
    dims = {"q": (hidden, hidden), "k": (kv_dim, hidden), "v": (kv_dim, hidden), "o": (hidden, hidden),
            "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    out = {}
    for b in range(n_layers):
        for name in NAMES:
            n = dims[name][0] * dims[name][1]
            blocks = -(-n // blocksize)
            out[(b, name)] = (-(-n // 2), blocks, 4 * -(-blocks // nested_blocksize))
    return out


def page_layout(arrays, scheme, page=2 << 20, small=256 << 10, unit=64 << 10):
    """The pager pages each layer covers, as {layer: [(page id, page bytes), ...]}.

    "separate": each array its own allocation, as ``place_in_pager`` made them
    before 2026-12-04: arrays above `small` bytes are rounded up to whole pages;
    smaller ones are packed one after another into slabs paged in `unit` bytes.
    "contiguous": the layers' arrays end to end in loading order (forward order),
    whole pages shared by neighbours at the boundaries."""
    layout, next_page, slab_off = {}, 0, 0
    if scheme == "separate":
        for key, sizes in arrays.items():
            pages = []
            for nbytes in sizes:
                if nbytes > small:
                    count = -(-nbytes // page)
                    pages += [(("p", next_page + i), page) for i in range(count)]
                    next_page += count
                else:
                    first, last = slab_off // unit, (slab_off + nbytes - 1) // unit
                    pages += [(("s", u), unit) for u in range(first, last + 1)]
                    slab_off += nbytes
            layout[key] = pages
    elif scheme == "contiguous":
        off = 0
        for key, sizes in arrays.items():
            nbytes = sum(sizes)
            layout[key] = [(("p", i), page) for i in range(off // page, (off + nbytes - 1) // page + 1)]
            off += nbytes
    else:
        raise ValueError(f"scheme must be 'separate' or 'contiguous', got {scheme!r}")
    return layout


def simulate_pages(trace, layout, budget):
    """LRU over pages, as the pager does it: a layer's prefetch makes its pages resident and most recent,
    then evicts the least recent pages of other layers until the resident bytes fit `budget`.
    Returns the bytes read at each position of `trace`."""
    resident = {}  # page -> bytes, least recent first (dict order)
    used = 0
    read = []
    for key in trace:
        got = 0
        mine = layout[key]
        for pid, nbytes in mine:
            if pid in resident:
                del resident[pid]
            else:
                got += nbytes
                used += nbytes
            resident[pid] = nbytes
        protect = {pid for pid, _ in mine}
        for pid in list(resident):
            if used <= budget:
                break
            if pid not in protect:
                used -= resident.pop(pid)
        read.append(got)
    return read


def step_order(n_blocks, checkpointing=True, cyclic=False):
    """The layers one training step touches, in order.

    Forward: blocks 0..n-1, each q k v o gate up down. Backward, blocks in reverse:
    with gradient checkpointing the block's forward is recomputed first, then its
    layers' input gradients run in reverse (down, up, gate, o, v, k, q). ``cyclic``:
    the forward alone (an inference pass, or the pure cyclic scan)."""
    fwd = [(b, n) for b in range(n_blocks) for n in NAMES]
    if cyclic:
        return fwd
    out = list(fwd)
    for b in reversed(range(n_blocks)):
        block = [(b, n) for n in NAMES]
        if checkpointing:
            out.extend(block)
        out.extend(reversed(block))
    return out


def simulate(trace, sizes, budget, policy, resident=()):
    """Replay `trace` (a list of keys) through a cache of `budget` bytes.

    policy: "lru" or "belady" (evict the resident key whose next use lies farthest
    ahead in `trace`; never used again counts as infinitely far). `resident`: keys
    in the cache at the start, least recent first. Returns the bytes read at each
    position of the trace (0 for a hit)."""
    if policy not in ("lru", "belady"):
        raise ValueError(f"policy must be 'lru' or 'belady', got {policy!r}")
    for k in set(trace):
        if sizes[k] > budget:
            raise ValueError(f"{k} ({sizes[k]} bytes) does not fit in the budget ({budget} bytes)")
    nxt, last = [0] * len(trace), {}  # nxt[i]: the next position that uses trace[i]'s key
    for i in range(len(trace) - 1, -1, -1):
        nxt[i] = last.get(trace[i], len(trace))
        last[trace[i]] = i
    cache = {}  # key -> (recency, next use); dicts keep insertion order
    used, clock = 0, 0
    for k in resident:
        if used + sizes[k] <= budget:
            cache[k] = (clock, last.get(k, len(trace)))
            used += sizes[k]
            clock += 1
    read = []
    for i, k in enumerate(trace):
        clock += 1
        if k in cache:
            cache[k] = (clock, nxt[i])
            read.append(0)
            continue
        while used + sizes[k] > budget:
            if policy == "lru":
                victim = min(cache, key=lambda c: cache[c][0])
            else:
                victim = max(cache, key=lambda c: cache[c][1])
            used -= sizes[victim]
            del cache[victim]
        cache[k] = (clock, nxt[i])
        used += sizes[k]
        read.append(sizes[k])
    return read


def per_step(read, step_len):
    """Bytes read in each step of a trace made of equal steps."""
    return [sum(read[i:i + step_len]) for i in range(0, len(read), step_len)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="65b")
    ap.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the shape's)")
    ap.add_argument("--budget", default="8G", help="bytes of base in memory: 8G, 1.5G, or 0.5x of the base")
    ap.add_argument("--steps", type=int, default=3, help="steps replayed; the last is the steady state")
    ap.add_argument("--cyclic", action="store_true", help="also replay a forward-only cyclic scan")
    ap.add_argument("--no-checkpointing", action="store_true", help="backward without recomputed forwards")
    ap.add_argument("--page-bytes", type=int, default=2 << 20, help="the pager's page (default 2 MiB)")
    args = ap.parse_args(argv)
    sizes, n_blocks = layer_sizes(args.shape, args.layers)
    total = sum(sizes.values())
    budget = parse_size(args.budget, total)
    print(f"{args.shape}, {n_blocks} blocks: 4-bit base {total / GiB:.2f} GiB, budget {budget / GiB:.2f} GiB "
          f"({budget / total:.0%} of the base)")
    orders = [("training step" + (" (no checkpointing)" if args.no_checkpointing else " (checkpointing)"),
               step_order(n_blocks, not args.no_checkpointing))]
    if args.cyclic:
        orders.append(("cyclic scan (forward only)", step_order(n_blocks, cyclic=True)))
    loaded = list(sizes)  # after loading, the last layers loaded are the most recent
    print(f"{'access order':<36} {'start':<12} {'policy':<8} {'step 1 MiB':>10} {'steady MiB/step':>16} "
          f"{'steady / base':>14}")
    for label, order in orders:
        for start, resident in (("empty", ()), ("after load", loaded)):
            res = {}
            for policy in ("lru", "belady"):
                steps = per_step(simulate(order * args.steps, sizes, budget, policy, resident), len(order))
                res[policy] = steps
                print(f"{label:<36} {start:<12} {policy:<8} {steps[0] / MiB:>10.0f} {steps[-1] / MiB:>16.0f} "
                      f"{steps[-1] / total:>14.2f}")
            gap = res["lru"][-1] / res["belady"][-1] if res["belady"][-1] else float("inf")
            print(f"{'':<36} {'':<12} {'LRU/opt':<8} {'':>10} {gap:>16.3f}")
            arrays = layer_arrays(args.shape, args.layers)
            for scheme in ("separate", "contiguous"):
                layout = page_layout(arrays, scheme, page=args.page_bytes)
                warm = loaded if start == "after load" else []  # loading touches every layer once, in order
                read = simulate_pages(warm + order * args.steps, layout, budget)[len(warm):]
                steps = per_step(read, len(order))
                print(f"{'':<36} {start:<12} {'pages, ' + scheme:<8} {steps[0] / MiB:>10.0f} "
                      f"{steps[-1] / MiB:>16.0f} {steps[-1] / total:>14.2f}")


if __name__ == "__main__":
    main()
