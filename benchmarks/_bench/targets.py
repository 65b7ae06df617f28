"""Checks of the issue's targets against a run's results. Each builder returns a function
(results, copy_bw) -> (measured text, met: True, False or None when nothing was measured);
bench_kernels.py's TARGETS pairs them with their descriptions and thresholds."""
import math

from .report import fmt_shape


def _speedups(results, peers):
    pyq = {(r.op.key, r.dtype, r.shape): r.best for r in results if r.library == "pyqlora" and r.times}
    return [(r.best / pyq[(r.op.key, r.dtype, r.shape)], r) for r in results
            if r.library in peers and r.times and (r.op.key, r.dtype, r.shape) in pyq]


def _largest(results):
    return max((r.shape for r in results), key=math.prod, default=None)


def min_speedup(peers, op_keys=None, threshold=1.0, largest_only=False):
    def check(results, copy_bw):
        big = _largest(results)
        pairs = [(x, r) for x, r in _speedups(results, peers)
                 if (op_keys is None or r.op.key in op_keys) and (not largest_only or r.shape == big)]
        if not pairs:
            return "no measured pair", None
        worst, r = min(pairs, key=lambda p: p[0])
        return (f"slowest ratio {worst:.1f}x ({r.library}, {r.op.label}, {r.dtype}, {fmt_shape(r.shape)})",
                worst >= threshold)
    return check


def cross_speedup(mine_key, peer, peer_key, threshold):
    """pyqlora's `mine_key` against the peer's `peer_key` (e.g. its only working variant)."""
    def check(results, copy_bw):
        big = _largest(results)
        pairs = []
        for r in results:
            if r.library == "pyqlora" and r.op.key == mine_key and r.shape == big and r.times:
                theirs = [p for p in results if p.library == peer and p.op.key == peer_key and p.shape == big
                          and p.dtype == r.dtype and p.times]
                pairs += [(p.best / r.best, r) for p in theirs]
        if not pairs:
            return "no measured pair", None
        worst, r = min(pairs, key=lambda p: p[0])
        return f"slowest ratio {worst:.1f}x ({r.dtype}, {fmt_shape(r.shape)})", worst >= threshold
    return check


def fraction_of_copy(op_keys, fraction):
    def check(results, copy_bw):
        big = _largest(results)
        mine = [r for r in results if r.library == "pyqlora" and r.times and r.shape == big and r.op.key in op_keys]
        if not mine:
            return "not measured", None
        worst = min(mine, key=lambda r: r.gb_s())
        frac = worst.gb_s() / copy_bw
        return f"lowest {100 * frac:.0f}% ({worst.op.label}, {worst.dtype}, {fmt_shape(big)})", frac >= fraction
    return check


def evaluate_targets(targets, results, copy_bw):
    out = []
    for description, check in targets:
        measured, met = check(results, copy_bw)
        out.append({"target": description, "measured": measured,
                    "met": {True: "met", False: "missed", None: "not measured"}[met]})
    return out
