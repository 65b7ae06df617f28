#!/usr/bin/env python
"""Cost of the host pager on an AdamW-shaped sweep over optimizer state.

    python benchmarks/bench_pager.py [--state-mib 256] [--tensors 32] [--steps 5] [--spill-dir DIR]
    python benchmarks/bench_pager.py --small-vs-large [--total-mib 16] [--small-kib 4] [--large-kib 1024]
                                     [--budget-mib 1]
    python benchmarks/bench_pager.py --file-scan FILE [FILE ...] [--tensor-mib 64] [--budget-mib 1024]

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

With ``--file-scan``: the files are mapped read-only with ``Pager.map_file`` in
pieces of ``--tensor-mib`` (a checkpoint's tensors), and every piece is
prefetched once, in order, under ``--budget-mib``, as a paged 4-bit base is
read in one pass over its layers. Reported: the pager's read rate against the
disk's, the files read once with ``dd iflag=direct`` (or after dropping them
from the page cache where ``O_DIRECT`` is refused) in the same run; the files
are dropped from the page cache before the pager's pass (``POSIX_FADV_DONTNEED``,
which needs no privileges for clean pages).

Numbers depend on the disk under the spill directory and the page cache; they
are measurements of this machine in this run, not claims.
"""
import argparse
import os
import platform
import statistics
import time

import numpy as np

import pyqlora as pq

# _bench is the folder beside this file (sys.path[0] when it runs as a script)
from _bench.machine import disk_read_rate, drop_cache


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


def file_scan(args):
    paths = args.file_scan
    piece = args.tensor_mib << 20
    rates = [disk_read_rate(path) for path in paths]  # each file once, bypassing the page cache
    seconds = sum(os.path.getsize(path) / rate for path, (rate, _) in zip(paths, rates))
    disk, method = sum(os.path.getsize(path) for path in paths) / seconds, rates[0][1]
    for path in paths:
        drop_cache(path)
    with pq.Pager(budget_bytes=args.budget_mib << 20, spill_dir=args.spill_dir) as p:
        arrays = []
        for path in paths:
            size = os.path.getsize(path)
            arrays += [p.map_file(path, off, min(piece, size - off)) for off in range(0, size, piece)]
        total = sum(a.nbytes for a in arrays)
        t0 = time.perf_counter()
        for a in arrays:
            p.prefetch(a)
        secs = time.perf_counter() - t0
        st = p.stats()
    rate = total / secs
    print(f"{len(paths)} file(s), {total / 1e9:.2f} GB in {len(arrays)} mapped pieces of {args.tensor_mib} MiB, "
          f"budget {args.budget_mib} MiB")
    print(f"disk, one sequential read ({method}): {disk / 1e6:8.1f} MB/s")
    print(f"pager, map_file + prefetch of every piece: {rate / 1e6:8.1f} MB/s = {rate / disk:.2f}x the disk "
          f"({st['page_ins']} page-ins of {st['page_bytes'] >> 20} MiB, {secs:.1f} s)")
    return {"disk_Bps": disk, "disk_method": method, "pager_Bps": rate, "bytes": total, "seconds": secs}


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
    ap.add_argument("--budget-mib", type=int, default=None,
                    help="the pager's budget (default 1 with --small-vs-large, 1024 with --file-scan)")
    ap.add_argument("--file-scan", nargs="+", default=None, metavar="FILE",
                    help="map FILEs read-only in pieces and prefetch each once, against the disk's read rate")
    ap.add_argument("--tensor-mib", type=int, default=64, help="size of the mapped pieces with --file-scan")
    args = ap.parse_args()
    if args.file_scan:
        args.budget_mib = 1024 if args.budget_mib is None else args.budget_mib
        file_scan(args)
        return
    args.budget_mib = 1 if args.budget_mib is None else args.budget_mib
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
