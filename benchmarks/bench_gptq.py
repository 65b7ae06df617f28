"""Speed of calibrated rounding (``pq.quantize(..., hessian=H)``, issue 22) against the machine's float32 GEMM.

For each layer shape (rows x K) it times, in the same run and interleaved (the
development machine is shared, so only same-run ratios mean anything):

- the solve: nf4core's error-feedback kernel on a given factor (``_gptq_codes``),
  counted as ``rows * K**2`` flops (the updates are rows * K**2 / 2 fused
  multiply-adds);
- the factor: NumPy's LAPACK Cholesky and triangular inverse of the dampened H
  (float64, once per distinct H);
- ``torch.mm`` of (rows x K) @ (K x K) in float32, ``2 * rows * K**2`` flops;
- round-to-nearest ``pq.quantize`` of the same weight, for scale.

and prints the solve's GFLOP/s as a fraction of torch.mm's (the issue's target:
>= 50 % for K >= 1024). Median of `--repeat` runs each. Both column orders are
timed (``--order``): natural, and act order (columns by decreasing H[i, i]), which
``prepare_model(calibration=)`` uses by default.

Usage::

    python benchmarks/bench_gptq.py [--threads 1] [--repeat 5] [--json out.json]
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

import pyqlora as pq
from pyqlora import _quantize

SHAPES = [(576, 576), (1536, 576), (576, 1536), (1536, 1536), (4096, 4096)]


def _median_time(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--shapes", nargs="*", default=None, help="ROWSxK, e.g. 1536x1536")
    p.add_argument("--order", choices=["natural", "act", "both"], default="both")
    p.add_argument("--json", help="write the rows as JSON here")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    pq.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows_out = []
    print(f"threads {args.threads}, ISA {pq.get_isa()}")
    orders = ["natural", "act"] if args.order == "both" else [args.order]
    print(f"{'rows x K':>12} {'order':>8} {'solve s':>9} {'GFLOP/s':>8} {'torch.mm GFLOP/s':>17} {'ratio':>6} "
          f"{'factor s':>9} {'RTN s':>7}")
    for (rows, k), order in [(shape, order) for shape in shapes for order in orders]:
        w = rng.standard_normal((rows, k), dtype=np.float32)
        # uneven input scales, as a layer's activations have, so that act order permutes the columns
        x = rng.standard_normal((2 * k, k), dtype=np.float32) * rng.uniform(0.2, 3.0, k).astype(np.float32)
        h = x.T @ x
        u, perm, _ = _quantize.hessian_factor(h, k, order=order)
        u32 = u.astype(np.float32)
        a = torch.from_numpy(w)
        b = torch.randn(k, k)
        t_solve, t_mm = [], []
        for _ in range(args.repeat):  # interleaved: both see the same load
            t_solve.append(_median_time(lambda: _quantize._gptq_codes(w, u32, perm, "nf4", 64), 1))
            t_mm.append(_median_time(lambda: torch.mm(a, b), 1))
        t_solve, t_mm = statistics.median(t_solve), statistics.median(t_mm)
        t_factor = _median_time(lambda: _quantize.hessian_factor(h, k, order=order), max(1, args.repeat // 2))
        t_rtn = _median_time(lambda: pq.quantize(w), args.repeat)
        solve_rate = rows * k * k / t_solve / 1e9
        mm_rate = 2 * rows * k * k / t_mm / 1e9
        row = {"rows": rows, "K": k, "order": order, "threads": args.threads, "solve_s": t_solve,
               "solve_gflops": solve_rate, "mm_gflops": mm_rate, "ratio": solve_rate / mm_rate,
               "factor_s": t_factor, "rtn_s": t_rtn}
        rows_out.append(row)
        print(f"{rows:>5} x {k:<5} {order:>8} {t_solve:9.4f} {solve_rate:8.1f} {mm_rate:17.1f} "
              f"{solve_rate / mm_rate:6.0%} {t_factor:9.4f} {t_rtn:7.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
