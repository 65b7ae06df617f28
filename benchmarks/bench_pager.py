#!/usr/bin/env python
"""Cost of the host pager on an AdamW-shaped sweep over optimizer state.

    python benchmarks/bench_pager.py [--state-mib 256] [--tensors 32] [--steps 5] [--spill-dir DIR]

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

Numbers depend on the disk under the spill directory and the page cache; they
are measurements of this machine in this run, not claims.
"""
import argparse
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-mib", type=int, default=256)
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--spill-dir", default=None)
    args = ap.parse_args()
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
