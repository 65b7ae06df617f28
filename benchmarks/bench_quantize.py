"""Quantize / dequantize throughput: pyqlora against bitsandbytes (CPU), same run.

    python benchmarks/bench_quantize.py [--rows 4096 --cols 4096 --repeat 5 --json out.json]

Prints Gparam/s for each operation, the ratio pyqlora / bitsandbytes, and each
figure's memory traffic as a fraction of this machine's copy bandwidth measured
in the same run (numpy copy of a 256 MiB buffer). bitsandbytes missing is
reported, not skipped silently.
"""
import argparse
import json
import os
import time

import numpy as np

import pyqlora as pq


def best_of(fn, repeat):
    fn()  # warm up (page faults, caches)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth(repeat):
    a = np.ones(64 * 2**20, np.float32)
    b = np.empty_like(a)
    t = best_of(lambda: np.copyto(b, a), repeat)
    return 2 * a.nbytes / t / 1e9  # read + write


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    try:
        import torch
        import bitsandbytes.functional as F

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    except ImportError as exc:
        F = None
        print(f"bitsandbytes: missing ({exc}); only pyqlora is measured")

    n = args.rows * args.cols
    bw = copy_bandwidth(args.repeat)
    print(f"{args.rows}x{args.cols}, NF4, blocksize 64, best of {args.repeat}; copy bandwidth {bw:.1f} GB/s")
    rows = []
    rng = np.random.default_rng(0)
    for dtype in ["float32", "bfloat16"]:
        x = rng.standard_normal((args.rows, args.cols)).astype(pq._dtypes.normalize_dtype(dtype))
        isz = x.itemsize
        q = pq.quantize(x, double_quant=True)
        for op, fn_pq, traffic in [
            ("quantize+DQ", lambda: pq.quantize(x, double_quant=True), isz + 0.5),
            ("dequantize", lambda: pq.dequantize(q), isz + 0.5),
        ]:
            t = best_of(fn_pq, args.repeat)
            theirs = None
            if F is not None:
                xt = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) if dtype == "bfloat16" else \
                    torch.from_numpy(x)
                packed, state = F.quantize_4bit(xt, blocksize=64, quant_type="nf4", compress_statistics=True)
                fn_bnb = (lambda: F.quantize_4bit(xt, blocksize=64, quant_type="nf4", compress_statistics=True)) \
                    if op.startswith("quantize") else (lambda: F.dequantize_4bit(packed, state))
                theirs = best_of(fn_bnb, max(1, args.repeat // 2))
            rows.append({
                "op": op, "dtype": dtype, "pyqlora_gparam_s": n / t / 1e9,
                "bnb_gparam_s": None if theirs is None else n / theirs / 1e9,
                "speedup_vs_bnb": None if theirs is None else theirs / t,
                "fraction_of_copy_bw": n * traffic / t / 1e9 / bw,
            })
    print(f"{'op':<12} {'dtype':<9} {'pyqlora Gp/s':>12} {'bnb Gp/s':>9} {'ratio':>6} {'of copy BW':>10}")
    for r in rows:
        bnb_s = "missing" if r["bnb_gparam_s"] is None else f"{r['bnb_gparam_s']:.3f}"
        ratio = "-" if r["speedup_vs_bnb"] is None else f"{r['speedup_vs_bnb']:.1f}x"
        print(f"{r['op']:<12} {r['dtype']:<9} {r['pyqlora_gparam_s']:>12.3f} {bnb_s:>9} {ratio:>6} "
              f"{100 * r['fraction_of_copy_bw']:>9.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bandwidth_gb_s": bw, "rows": rows, "shape": [args.rows, args.cols],
                       "config": pq.show_config(file=open(os.devnull, "w"))}, f, indent=2)


if __name__ == "__main__":
    main()
