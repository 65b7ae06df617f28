#!/usr/bin/env python
"""Cost of the host pager on an AdamW-shaped sweep over optimizer state.

    python benchmarks/bench_pager.py [--state-mib 256] [--tensors 32] [--steps 5] [--spill-dir DIR]
    python benchmarks/bench_pager.py --small-vs-large [--total-mib 16] [--small-kib 4] [--large-kib 1024]
                                     [--budget-mib 1]

The "state" is two float32 arrays per tensor (first and second moment, like
AdamW), ``--state-mib`` in all, split over ``--tensors`` tensors. One step
visits every tensor once: prefetch both moments, then an AdamW-like update
(``m = b1*m + (1-b1)*g``; ``v = b2*v + (1-b2)*g*g``) in numpy. Reported,
median over ``--steps`` steps after one warm-up step:

- plain numpy arrays (no pager): the baseline step time;
- pager, unlimited budget (everything fits): overhead against the baseline;
- pager, budget 25% of the state: step time, page-ins/outs per step, and the
  peak resident bytes of the pager's memory (mincore) after each prefetch;
- ``prefetch`` of an already-resident tensor: time per call.

With ``--small-vs-large``: the same bytes (``--total-mib``) as many small
arrays (``--small-kib`` each) and as few large ones (``--large-kib``), in two
pagers each: without a budget (every array written, then ``evict()`` twice) and
under ``--budget-mib`` (one sweep that prefetches and writes every array in
turn, then ``evict()`` twice). Reported per layout: the time of the first and
second ``evict()`` and of the sweep, the page-outs of the second ``evict()``
(0 if eviction is idempotent), resident bytes after each ``evict()``, whether
every byte survived, and the ratio small / large of each time (1.0: the cost
follows the bytes, not the number of arrays).

Numbers depend on the disk under the spill directory and the page cache; they
are measurements of this machine in this run, not claims.
"""
import argparse
import platform
import statistics
import time

import numpy as np

import pyqlora as pq


def make_state(n_tensors, per_tensor, alloc):
    return [(alloc(per_tensor), alloc(per_tensor)) for _ in range(n_tensors)]


def step(state, grads, pager=None, peak=None):
    b1, b2 = np.float32(0.9), np.float32(0.999)
    for (m, v), g in zip(state, grads):
        if pager is not None:
            pager.prefetch(m)
            pager.prefetch(v)
            if peak is not None:
                peak[0] = max(peak[0], pager.stats()["resident_bytes"])
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g


def timed(fn, steps):
    fn()  # warm-up: first touch, page cache
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def layout_run(n_arrays, array_bytes, budget, spill_dir):
    """One pager holding n_arrays of array_bytes: the timings and counters of --small-vs-large."""
    r = {}
    with pq.Pager(budget_bytes=budget, spill_dir=spill_dir) as p:
        arrays = [p.zeros(array_bytes, np.uint8) for _ in range(n_arrays)]
        t = time.perf_counter()
        for i, a in enumerate(arrays):
            if budget is not None:
                p.prefetch(a)
            a[:] = (i * 7 + 1) % 251
        r["fill"] = time.perf_counter() - t
        r["fill_resident"] = p.stats()["resident_bytes"]
        for k in (1, 2):
            before = p.stats()["page_outs"]
            t = time.perf_counter()
            p.evict()
            r[f"evict{k}"] = time.perf_counter() - t
            s = p.stats()
            r[f"evict{k}_outs"] = s["page_outs"] - before
            r[f"evict{k}_resident"] = s["resident_bytes"]
        r["intact"] = all(int(a.min()) == int(a.max()) == (i * 7 + 1) % 251 for i, a in enumerate(arrays))
        r["spill_dir"] = p.spill_dir
    return r


def small_vs_large(args):
    total = args.total_mib << 20
    small, large = args.small_kib << 10, args.large_kib << 10
    budget = args.budget_mib << 20
    print(f"CPU: {cpu_name()}; pyqlora {pq.__version__} from {pq.__file__}")
    print(f"{total >> 20} MiB as {total // small} x {small >> 10} KiB arrays and as {total // large} x "
          f"{large >> 10} KiB arrays")
    rows = []
    for label, budget_bytes, fill in (("no budget", None, "write all"),
                                      (f"budget {budget >> 20} MiB", budget, "prefetch+write sweep")):
        res = {name: layout_run(total // size, size, budget_bytes, args.spill_dir)
               for name, size in (("small", small), ("large", large))}
        print(f"-- {label} (spill dir {res['small']['spill_dir']})")
        for name in ("small", "large"):
            r = res[name]
            print(f"  {name:5s}: {fill} {r['fill'] * 1e3:8.1f} ms, evict {r['evict1'] * 1e3:8.1f} ms "
                  f"(resident after {r['evict1_resident'] / 2**20:.2f} MiB), evict again {r['evict2'] * 1e3:7.1f} ms "
                  f"({r['evict2_outs']} page-outs, resident {r['evict2_resident'] / 2**20:.2f} MiB), "
                  f"data intact: {r['intact']}")
        ratio = {k: res["small"][k] / max(res["large"][k], 1e-9) for k in ("fill", "evict1", "evict2")}
        print(f"  small / large: {fill} {ratio['fill']:.1f}x, evict {ratio['evict1']:.1f}x, "
              f"evict again {ratio['evict2']:.1f}x")
        rows.append((label, res, ratio))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-mib", type=int, default=256)
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--spill-dir", default=None)
    ap.add_argument("--small-vs-large", action="store_true",
                    help="many small against few large arrays of the same bytes (evict, budgeted sweep)")
    ap.add_argument("--total-mib", type=int, default=16)
    ap.add_argument("--small-kib", type=int, default=4)
    ap.add_argument("--large-kib", type=int, default=1024)
    ap.add_argument("--budget-mib", type=int, default=1)
    args = ap.parse_args()
    if args.small_vs_large:
        small_vs_large(args)
        return
    state_bytes = args.state_mib << 20
    per_tensor = state_bytes // (2 * 4 * args.tensors)
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(per_tensor, dtype=np.float32) for _ in range(args.tensors)]

    base = make_state(args.tensors, per_tensor, lambda n: np.zeros(n, np.float32))
    t_base = timed(lambda: step(base, grads), args.steps)
    print(f"state {args.state_mib} MiB in {args.tensors} x 2 tensors of {per_tensor * 4 / 2**20:.1f} MiB")
    print(f"numpy arrays (no pager):      {t_base * 1e3:8.1f} ms/step")

    with pq.Pager(spill_dir=args.spill_dir) as p:
        st = make_state(args.tensors, per_tensor, lambda n: p.zeros(n, np.float32))
        t_fit = timed(lambda: step(st, grads, p), args.steps)
        m0 = st[0][0]
        t0 = time.perf_counter()
        for _ in range(1000):
            p.prefetch(m0)
        t_pf = (time.perf_counter() - t0) / 1000
        print(f"pager, unlimited budget:      {t_fit * 1e3:8.1f} ms/step ({100 * (t_fit / t_base - 1):+.1f}% vs numpy)")
        print(f"prefetch of a resident {m0.nbytes / 2**20:.1f} MiB tensor: {t_pf * 1e6:.1f} us/call")
        print(f"spill dir: {p.spill_dir} (tmpfs: {p.spill_is_tmpfs})")

    budget = state_bytes // 4
    with pq.Pager(budget_bytes=budget, spill_dir=args.spill_dir) as p:
        st = make_state(args.tensors, per_tensor, lambda n: p.zeros(n, np.float32))
        step(st, grads, p)
        s0 = p.stats()
        peak = [0]
        t_q = timed(lambda: step(st, grads, p, peak), args.steps)
        s1 = p.stats()
        n = args.steps + 1
        print(
            f"pager, budget 25% ({budget >> 20} MiB): {t_q * 1e3:8.1f} ms/step ({t_q / t_base:.1f}x numpy), "
            f"{(s1['page_ins'] - s0['page_ins']) / n:.0f} page-ins and "
            f"{(s1['page_outs'] - s0['page_outs']) / n:.0f} page-outs per step, "
            f"peak resident {peak[0] / 2**20:.1f} MiB (budget + {(peak[0] - budget) / 2**20:.1f} MiB)"
        )


if __name__ == "__main__":
    main()
