"""Fused 4-bit products: pq.matmul_4bit against torch on the dense weight and bitsandbytes.

    python benchmarks/bench_matmul.py [--n 4096] [--k 4096] [--threads 2] [--repeat 20]

For M = 1 and 8 rows (generation): y = x W^T with W NF4 + DQ (blocksize 64),
against torch fp32 / bf16 `x @ W.T` on the dense weight and bitsandbytes'
Linear4bit on CPU, all in the same run with the same thread count; plus the
backward product x W (grad_input). Best of --repeat calls after a warm-up.
"""
import argparse
import os
import time


def best_ms(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="out_features")
    ap.add_argument("--k", type=int, default=4096, help="in_features")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch

    import pyqlora as pq

    torch.set_num_threads(args.threads)
    pq.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((args.n, args.k)) * 0.02).astype(np.float32)
    q = pq.quantize(w)
    W = torch.from_numpy(w)
    Wb = W.bfloat16()
    try:
        import bitsandbytes as bnb

        dense = torch.nn.Linear(args.k, args.n, bias=False)
        dense.weight.data = W.clone()
        l4 = bnb.nn.Linear4bit(args.k, args.n, bias=False, quant_type="nf4", compress_statistics=True)
        l4.load_state_dict(dense.state_dict())
        l4 = l4.to("cpu")
    except ImportError as exc:
        l4 = None
        print(f"bitsandbytes: missing ({exc})")
    print(f"W {args.n}x{args.k} NF4+DQ; {args.threads} threads; best of {args.repeat}")
    print(f"{'M':>3} {'product':<10} {'pyqlora':>9} {'torch f32':>10} {'torch bf16':>11} {'bnb 4bit':>9} "
          f"{'x f32':>6} {'x bf16':>7} {'x bnb':>6}")
    for m in (1, 8):
        x = rng.standard_normal((m, args.k)).astype(np.float32)
        out = np.empty((m, args.n), np.float32)
        X = torch.from_numpy(x)
        ours = best_ms(lambda: pq.matmul_4bit(x, q, out=out), args.repeat)
        t32 = best_ms(lambda: X @ W.T, args.repeat)
        tbf = best_ms(lambda: X.bfloat16() @ Wb.T, args.repeat)
        with torch.no_grad():
            tb = best_ms(lambda: l4(X), max(3, args.repeat // 4)) if l4 is not None else float("nan")
        print(f"{m:>3} {'x W^T':<10} {ours:8.3f}ms {t32:9.3f}ms {tbf:10.3f}ms {tb:8.2f}ms "
              f"{t32 / ours:5.2f}x {tbf / ours:6.2f}x {tb / ours:5.1f}x")
        g = rng.standard_normal((m, args.n)).astype(np.float32)
        gout = np.empty((m, args.k), np.float32)
        G = torch.from_numpy(g)
        ours_b = best_ms(lambda: pq.matmul_4bit(g, q, transpose=False, out=gout), args.repeat)
        t32_b = best_ms(lambda: G @ W, args.repeat)
        tbf_b = best_ms(lambda: G.bfloat16() @ Wb, args.repeat)
        print(f"{m:>3} {'g W':<10} {ours_b:8.3f}ms {t32_b:9.3f}ms {tbf_b:10.3f}ms {'':>9} "
              f"{t32_b / ours_b:5.2f}x {tbf_b / ours_b:6.2f}x")


if __name__ == "__main__":
    main()
