"""Fused 4-bit products: pq.matmul_4bit against torch on the dense weight and bitsandbytes.

    python benchmarks/bench_matmul.py [--n 4096] [--k 4096] [--threads 2] [--repeat 20] [--train] [--coexist]
                                      [--per-weight] [--bf16-rows] [--gemv-pairs] [--cold]
                                      [--train-fp32 [--train-rows 64,512,2048]] [--decode-shapes] [--fused-rows]

Generation (M = 1, 2, 4, 8 rows): y = x W^T with W NF4 + DQ (blocksize 64), and
the backward product g W (grad_input), against torch fp32 / bf16 on the dense
weight and bitsandbytes' Linear4bit on CPU, all in the same run with the same
thread count. ``--train`` adds the training shapes (M = 1024, W 4096x4096,
11008x4096 and 4096x11008, bf16): forward + grad_input of pq.matmul_4bit on AMX
tiles (what pyqlora.nn runs where pq.get_amx() is True; panels of W decoded as it
goes) and of the tiled path (tiles of W decoded into a reused buffer for torch's
matmul; pyqlora.nn's path without AMX), against the same two products on a dense
bf16 weight, and against dequantizing the whole weight first.
Contenders run interleaved, best of --repeat rounds, so a slow spell of the
machine hits all of them alike. ``--coexist`` times the M = 1 GEMV back to
back, right after torch ops (whose OpenMP workers then spin-wait on the
cores for a while: set OMP_WAIT_POLICY=PASSIVE in the environment to compare)
and after the process idled, with process CPU time beside the wall time, on
nf4core's pool and on the OpenMP runtime's threads (pq.set_threading).
``--per-weight`` prints the M = 1 GEMV's time per 16 weights at 1 thread and at
--threads, for a W that fits in L2 (512 x K) and for N x K: equal figures mean the
kernel is bound by its instructions, not by memory. ``--bf16-rows`` times bfloat16
x with M = 1..64 rows through pq.matmul_4bit with AMX on and off (pq.set_amx),
the tiled path and torch on the dense weight: where the AMX product takes over.
``--gemv-pairs`` times the M = 1 GEMV and torch fp32 each back to back (W partly stays
in the cores' L2) and in a two-way race (each evicts the other), three times.
``--cold`` times the M = 1 GEMV of the three with W evicted from every cache before each
call (a torch sum over twice the largest cache), as in generation with a model larger
than the caches.
``--train-fp32`` times float32 x with M = ``--train-rows`` rows (default 64, 512, 2048) on W
4096x4096, 11008x4096 and 4096x11008: the forward x W^T and the backward g W apart, each
through pyqlora.nn's path for that many rows (tiled: no dense W) against torch's dense
float32 GEMM. ``--decode-shapes`` times the M = 1 GEMV on small shapes at 1 thread and at
--threads (best and median): where splitting the product starts to pay. ``--fused-rows``
times float32 x of 8..256 rows through the fused kernel and through the tiles, each
direction against torch's dense GEMM: where the fused kernel's row limits come from.
"""
import argparse
import os
import sys
import time


def race(fns, repeat):
    """Best time (ms) of each function, calling them in turn `repeat` times after a warm-up."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return [1e3 * b for b in best]


def weight(np, pq, rng, n, k):
    """A random n x k float32 weight (std 0.02) and its NF4 + DQ quantization."""
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    return w, pq.quantize(w)


def generation(args, np, torch, pq):
    rng = np.random.default_rng(0)
    w, q = weight(np, pq, rng, args.n, args.k)
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
    print(f"W {args.n}x{args.k} NF4+DQ; {args.threads} threads (helpers: {pq.get_threading()}); best of {args.repeat}")
    print(f"{'M':>3} {'product':<10} {'pyqlora':>9} {'torch f32':>10} {'torch bf16':>11} {'bnb 4bit':>9} "
          f"{'x f32':>6} {'x bf16':>7} {'x bnb':>6}")
    for m in (1, 2, 4, 8):
        generation_row(args, np, torch, pq, rng, q, W, Wb, l4, m)


def generation_row(args, np, torch, pq, rng, q, W, Wb, l4, m):
    x = rng.standard_normal((m, args.k)).astype(np.float32)
    out = np.empty((m, args.n), np.float32)
    X = torch.from_numpy(x)
    Xb = X.bfloat16()
    ours, t32, tbf = race([lambda: pq.matmul_4bit(x, q, out=out), lambda: X @ W.T, lambda: Xb @ Wb.T], args.repeat)
    tb = float("nan")
    if l4 is not None and m in (1, 8):
        with torch.no_grad():
            tb = race([lambda: l4(X)], max(3, args.repeat // 4))[0]
    print(f"{m:>3} {'x W^T':<10} {ours:8.3f}ms {t32:9.3f}ms {tbf:10.3f}ms {tb:8.2f}ms "
          f"{t32 / ours:5.2f}x {tbf / ours:6.2f}x {tb / ours:5.1f}x")
    g = rng.standard_normal((m, args.n)).astype(np.float32)
    gout = np.empty((m, args.k), np.float32)
    G = torch.from_numpy(g)
    Gb = G.bfloat16()
    ours_b, t32_b, tbf_b = race([lambda: pq.matmul_4bit(g, q, transpose=False, out=gout), lambda: G @ W,
                                 lambda: Gb @ Wb], args.repeat)
    print(f"{m:>3} {'g W':<10} {ours_b:8.3f}ms {t32_b:9.3f}ms {tbf_b:10.3f}ms {'':>9} "
          f"{t32_b / ours_b:5.2f}x {tbf_b / ours_b:6.2f}x")


def coexist(args, np, torch, pq):
    """M = 1 GEMV right after itself, after torch ops, after 20 ms idle: wall and CPU ms,
    with nf4core's pool and (where torch loaded one) on the OpenMP runtime's threads."""
    rng = np.random.default_rng(2)
    w, q = weight(np, pq, rng, args.n, args.k)
    W = torch.from_numpy(w)
    Wb = W.bfloat16()
    big = torch.ones(16 << 20)  # 64 MiB: a torch op that runs on all of torch's threads
    x = rng.standard_normal((1, args.k)).astype(np.float32)
    X = torch.from_numpy(x)
    Xb = X.bfloat16()
    out = np.empty((1, args.n), np.float32)
    before = {"back to back": lambda: pq.matmul_4bit(x, q, out=out), "after torch bf16 x@W.T": lambda: Xb @ Wb.T,
              "after torch fp32 x@W.T": lambda: X @ W.T, "after torch 64 MiB sum": big.sum,
              "after 20 ms idle": lambda: time.sleep(0.02)}
    kinds = ["pool"]
    try:
        pq.set_threading("openmp")
        kinds.append("openmp")
    except ValueError:
        pass
    wall = {(k, n): [] for k in kinds for n in before}
    cpu = {(k, n): [] for k in kinds for n in before}
    for _ in range(3 * args.repeat):
        for kind in kinds:  # interleaved: a slow spell of the machine hits both alike
            pq.set_threading(kind)
            time.sleep(0.05)  # OpenMP's threads stop spinning after the other kind's last call
            pq.matmul_4bit(x, q, out=out)
            for name, pre in before.items():
                pre()
                c0, t0 = time.process_time(), time.perf_counter()
                pq.matmul_4bit(x, q, out=out)
                wall[kind, name].append(time.perf_counter() - t0)
                cpu[kind, name].append(time.process_time() - c0)
    pq.set_threading("auto")
    print(f"\nGEMV 1x{args.k} . ({args.n}x{args.k})^T, {args.threads} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load average {os.getloadavg()[0]:.1f}: "
          f"median / 90th percentile wall ms, median CPU ms (all threads), {3 * args.repeat} calls each")
    print(f"  {'':<24} " + "".join(f"{'helpers: ' + k:>28}" for k in kinds))
    for name in before:
        cells = []
        for kind in kinds:
            ws = sorted(wall[kind, name])
            cells.append(f"{1e3 * ws[len(ws) // 2]:7.3f} / {1e3 * ws[len(ws) * 9 // 10]:7.3f} "
                         f"({1e3 * sorted(cpu[kind, name])[len(ws) // 2]:6.3f})")
        print(f"  {name:<24} " + "".join(f"{c:>28}" for c in cells))


def per_weight(args, np, pq):
    rng = np.random.default_rng(0)
    print(f"M = 1 GEMV, NF4 + DQ blocksize 64: ns per 16 weights (best of {args.repeat})")
    for n in (512, args.n):
        q = pq.quantize(rng.standard_normal((n, args.k)).astype(np.float32), double_quant=True)
        x = rng.standard_normal((1, args.k)).astype(np.float32)
        out = np.empty((1, n), np.float32)
        cells = []
        for threads in sorted({1, args.threads}):
            pq.set_num_threads(threads)
            (best,) = race([lambda x=x, q=q, out=out: pq.matmul_4bit(x, q, out=out)], args.repeat)
            cells.append(f"{threads} thread(s) {best:.3f} ms = {1e6 * best * threads / (n * args.k / 16):.3f} ns")
        print(f"  W {n} x {args.k}: " + ", ".join(cells) + " (per thread)")
    pq.set_num_threads(args.threads)


def l3_bytes():
    """This machine's largest cache in bytes (sysfs), or 256 MiB where unknown."""
    import glob

    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=256 << 20)


def cold(args, np, torch, pq):
    """M = 1 GEMV with W in memory, as in generation with a model larger than the caches:
    before each call a torch sum (all threads) reads twice the largest cache."""
    rng = np.random.default_rng(4)
    w, q = weight(np, pq, rng, args.n, args.k)
    W = torch.from_numpy(w)
    Wb = W.bfloat16()
    x = rng.standard_normal((1, args.k)).astype(np.float32)
    X = torch.from_numpy(x)
    Xb = X.bfloat16()
    out = np.empty((1, args.n), np.float32)
    sweep = torch.ones(2 * l3_bytes() // 4)
    fns = {"pyqlora": lambda: pq.matmul_4bit(x, q, out=out), "torch fp32": lambda: X @ W.T,
           "torch bf16": lambda: Xb @ Wb.T}
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(args.repeat):
        for name, f in fns.items():
            sweep.sum()
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    print(f"\nGEMV 1x{args.k} . ({args.n}x{args.k})^T with W in memory (a {2 * l3_bytes() >> 20} MiB torch sum "
          f"before each call), {args.threads} threads (helpers: {pq.get_threading()}), median of {args.repeat}:")
    print(f"  pyqlora {med['pyqlora']:.3f} ms, torch fp32 {med['torch fp32']:.3f} ms "
          f"({med['torch fp32'] / med['pyqlora']:.2f}x), torch bf16 {med['torch bf16']:.3f} ms "
          f"({med['torch bf16'] / med['pyqlora']:.2f}x)")


def gemv_pairs(args, np, torch, pq):
    """M = 1 x W^T against torch fp32 three ways: each back to back, and in a two-way race."""
    rng = np.random.default_rng(3)
    w, q = weight(np, pq, rng, args.n, args.k)
    W = torch.from_numpy(w)
    x = rng.standard_normal((1, args.k)).astype(np.float32)
    X = torch.from_numpy(x)
    out = np.empty((1, args.n), np.float32)

    def ours():
        pq.matmul_4bit(x, q, out=out)

    def dense():
        X @ W.T

    print(f"\nGEMV pairs: 1 x {args.k} . ({args.n} x {args.k})^T NF4+DQ against torch fp32; {args.threads} threads; "
          f"best of {args.repeat * 5}")
    for rep in range(3):
        alone = [race([fn], args.repeat * 5)[0] for fn in (ours, dense)]
        pair = race([ours, dense], args.repeat * 5)
        print(f"  back to back: {alone[0]:.3f} / {alone[1]:.3f} ms = {alone[1] / alone[0]:.2f}x;  "
              f"two-way race: {pair[0]:.3f} / {pair[1]:.3f} ms = {pair[1] / pair[0]:.2f}x")


def bf16_rows(args, np, torch, pq):
    """Where AMX takes over: bfloat16 x with few rows, forward + grad_input, AMX on and off."""
    rng = np.random.default_rng(2)
    w, q = weight(np, pq, rng, args.n, args.k)
    Wb = torch.from_numpy(w).bfloat16()
    print(f"\nbf16 rows: W {args.n}x{args.k} NF4+DQ, forward x W^T + grad_input g W; {args.threads} threads; "
          f"best of {args.repeat}; AMX {'available' if pq.amx_available() else 'not available'}")
    print(f"{'M':>3} {'dense bf16':>11} {'pq AMX':>9} {'pq vector':>10} {'pq tiled':>9}")
    for m in (1, 2, 4, 5, 8, 16, 32, 64):
        bf16_row(args, torch, pq, q, Wb, m)


def forward_and_grad_input(torch, pq, x, g, Wb, q):
    """Closures timing x W^T + g W three ways: torch on the dense bf16 weight Wb,
    pq.matmul_4bit on q, and the tiled path (tiles of q handed to torch)."""
    from pyqlora._glue.products import tiled_product_torch
    from pyqlora._glue.tensors import as_numpy

    def dense():
        x @ Wb.T
        g @ Wb

    def fused():
        pq.matmul_4bit(as_numpy(x), q)
        pq.matmul_4bit(as_numpy(g), q, transpose=False)

    def tiled():
        tiled_product_torch(x, q, True)
        tiled_product_torch(g, q, False)

    return dense, fused, tiled


def bf16_row(args, torch, pq, q, Wb, m):
    amx = pq.get_amx()
    x = torch.randn(m, args.k).bfloat16()
    g = torch.randn(m, args.n).bfloat16()
    dense, ours, tiled = forward_and_grad_input(torch, pq, x, g, Wb, q)

    def vector():
        pq.set_amx(False)
        ours()
        pq.set_amx(amx)

    times = race([dense, ours, vector, tiled] if amx else [dense, vector, tiled], args.repeat)
    if not amx:
        times.insert(1, float("nan"))
    print(f"{m:>3} {times[0]:9.3f}ms {times[1]:7.3f}ms {times[2]:8.3f}ms {times[3]:7.3f}ms")


def training(args, np, torch, pq):
    rng = np.random.default_rng(1)
    m = 1024
    print(f"\ntraining shapes: M={m} bf16, forward x W^T + grad_input g W; {args.threads} threads; "
          f"best of {args.train_repeat}")
    amx = "pyqlora AMX" if pq.get_amx() else "(no AMX)"
    print(f"{'W (N x K)':<12} {'dense bf16':>11} {'TFLOP/s':>7} {amx:>12} {'ratio':>6} {'pyqlora tiled':>14} "
          f"{'ratio':>6} {'whole dequant':>14} {'ratio':>6}")
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        training_shape(args, np, torch, pq, rng, m, n, k)


def training_shape(args, np, torch, pq, rng, m, n, k):
    from pyqlora.nn import dequantize_weight

    w, q = weight(np, pq, rng, n, k)
    Wb = torch.from_numpy(w).bfloat16()
    del w
    x = torch.randn(m, k).bfloat16()
    g = torch.randn(m, n).bfloat16()
    dense, amx, tiled = forward_and_grad_input(torch, pq, x, g, Wb, q)

    def whole():
        wd = dequantize_weight(q, torch.bfloat16)
        x @ wd.T
        g @ wd

    if pq.get_amx():
        td, ta, tt, tw = race([dense, amx, tiled, whole], args.train_repeat)
        cell = f"{ta:10.1f}ms {ta / td:5.3f}x"
    else:
        td, tt, tw = race([dense, tiled, whole], args.train_repeat)
        cell = f"{'':>12} {'':>6}"
    tflops = 4 * m * n * k / td / 1e9  # two products of 2 m n k flops, td in ms
    print(f"{f'{n}x{k}':<12} {td:9.1f}ms {tflops:7.2f} {cell} {tt:12.1f}ms {tt / td:5.3f}x {tw:12.1f}ms "
          f"{tw / td:5.3f}x")


def train_fp32(args, np, torch, pq):
    """Float32 training shapes: the forward x W^T and the backward g W, each through
    pyqlora.nn's path for that many rows (the fused kernel for few rows, else tiles of W
    decoded into a reused float32 buffer and handed to torch's matmul: no dense copy of
    W; printed as the path, f/t where the directions differ) against torch's dense
    float32 GEMM on the same shapes, interleaved, best of --train-repeat."""
    from pyqlora._glue.products import choose_path, fused_product, tiled_product_torch

    rng = np.random.default_rng(2)
    rows = [int(v) for v in args.train_rows.split(",")]
    print(f"\nfloat32 training shapes: {args.threads} threads, best of {args.train_repeat}; ratio = pyqlora / dense "
          f"(time); GFLOP/s of torch's dense fp32 GEMM")
    print(f"{'W (N x K)':<12} {'M':>5} {'path':>6} {'fwd dense':>10} {'GFLOP/s':>8} {'fwd pq':>9} {'ratio':>6} "
          f"{'bwd dense':>10} {'GFLOP/s':>8} {'bwd pq':>9} {'ratio':>6}")
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        w, q = weight(np, pq, rng, n, k)
        W = torch.from_numpy(w)
        for m in rows:
            x = torch.randn(m, k)
            g = torch.randn(m, n)
            fwd, bwd = choose_path(x, q), choose_path(g, q, transpose=False)
            path = fwd if fwd == bwd else f"{fwd[0]}/{bwd[0]}"
            product = {"fused": fused_product, "tiled": tiled_product_torch}
            tf, tfq, tb, tbq = race([lambda: x @ W.T, lambda: product[fwd](x, q, True),
                                     lambda: g @ W, lambda: product[bwd](g, q, False)], args.train_repeat)
            gf = 2 * m * n * k / 1e6  # MFLOP; times in ms
            print(f"{f'{n}x{k}':<12} {m:>5} {path:>6} {tf:8.2f}ms {gf / tf:8.1f} {tfq:7.2f}ms {tfq / tf:5.3f}x "
                  f"{tb:8.2f}ms {gf / tb:8.1f} {tbq:7.2f}ms {tbq / tb:5.3f}x")


def fused_rows(args, np, torch, pq):
    """float32 x of M = 8..256 rows: nf4core's product ("fused": its row kernels, or its panels from the path's
    crossover; NF4CORE_PANEL_ROWS=N moves that crossover to N rows for both directions) and the tiles against
    torch's dense float32 GEMM, forward (x W^T) and backward (g W) apart, interleaved, best of --train-repeat:
    where pyqlora._glue.products' fused_max_rows limits come from (ratios of time; the limits in use are
    printed)."""
    from pyqlora._glue.products import fused_max_rows, fused_product, tiled_product_torch

    rng = np.random.default_rng(4)
    limits = [fused_max_rows(torch.float32, t) for t in (True, False)]
    used = ("at every row count" if min(limits) == sys.maxsize
            else f"up to {limits[0]} rows forward, {limits[1]} backward")
    print(f"\nfloat32 rows, {args.threads} threads, kernel path {pq.get_isa()}, best of {args.train_repeat}: time / "
          f"dense; pyqlora.nn takes the fused product {used}")
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        w, q = weight(np, pq, rng, n, k)
        W = torch.from_numpy(w)
        for m in (8, 16, 32, 64, 128, 256):
            x, g = torch.randn(m, k), torch.randn(m, n)
            r = race([lambda: x @ W.T, lambda: tiled_product_torch(x, q, True), lambda: fused_product(x, q, True),
                      lambda: g @ W, lambda: tiled_product_torch(g, q, False), lambda: fused_product(g, q, False)],
                     args.train_repeat)
            print(f"  {n:>5} x {k:<5} M = {m:>3}: forward tiles {r[1] / r[0]:.2f} fused {r[2] / r[0]:.2f} | "
                  f"backward tiles {r[4] / r[3]:.2f} fused {r[5] / r[3]:.2f}  (dense {r[0]:.1f} / {r[3]:.1f} ms)",
                  flush=True)


def decode_shapes(args, np, torch, pq):
    """M = 1 GEMV on small (decode) shapes at 1 thread and at --threads, with a small torch
    op between calls as in generation: where the split into tasks starts to pay (matmul.cpp's
    work threshold). Best and median of --repeat rounds, interleaved."""
    rng = np.random.default_rng(3)
    a, b = torch.randn(64, 576), torch.randn(576, 64)
    print(f"\nM = 1 GEMV, decode shapes: 1 thread against {args.threads} (best / median of {args.repeat}; "
          f"a torch op before each call)")
    for n, k in ((192, 576), (256, 576), (384, 576), (576, 576), (1536, 576), (576, 1536), (2048, 2048)):
        q = pq.quantize(rng.standard_normal((n, k)).astype(np.float32), double_quant=True)
        x = rng.standard_normal((1, k)).astype(np.float32)
        out = np.empty((1, n), np.float32)
        times = {1: [], args.threads: []}
        for _ in range(args.repeat):
            for t in times:
                pq.set_num_threads(t)
                torch.mm(a, b)
                t0 = time.perf_counter()
                pq.matmul_4bit(x, q, out=out)
                times[t].append(time.perf_counter() - t0)
        one, many = (sorted(times[t]) for t in (1, args.threads))
        med = len(one) // 2
        print(f"  {n:>5} x {k:<5} ({n * k / 1e3:6.0f}K weights): "
              f"1 thread {1e6 * one[0]:7.1f} / {1e6 * one[med]:7.1f} us, "
              f"{args.threads} threads {1e6 * many[0]:7.1f} / {1e6 * many[med]:7.1f} us: "
              f"{many[0] / one[0]:.2f} / {many[med] / one[med]:.2f}")
    pq.set_num_threads(args.threads)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="out_features")
    ap.add_argument("--k", type=int, default=4096, help="in_features")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--train", action="store_true", help="also the training shapes (M = 1024)")
    ap.add_argument("--train-repeat", type=int, default=5)
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--coexist", action="store_true", help="the M = 1 GEMV next to torch ops (see above)")
    ap.add_argument("--per-weight", action="store_true", help="M = 1 GEMV time per 16 weights (see above)")
    ap.add_argument("--bf16-rows", action="store_true", help="bfloat16 x, M = 1..64: AMX on and off (see above)")
    ap.add_argument("--gemv-pairs", action="store_true", help="M = 1 against torch fp32 alone and in a race")
    ap.add_argument("--cold", action="store_true", help="M = 1 with W in memory, not in a cache (see above)")
    ap.add_argument("--train-fp32", action="store_true",
                    help="float32 training shapes, forward and backward apart, against torch dense fp32")
    ap.add_argument("--train-rows", default="64,512,2048", help="rows M for --train-fp32 (comma-separated)")
    ap.add_argument("--decode-shapes", action="store_true", help="M = 1 GEMV on small shapes, 1 thread or more")
    ap.add_argument("--fused-rows", action="store_true", help="float32 M = 8..256: fused kernel, tiles, dense")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch

    import pyqlora as pq

    torch.set_num_threads(args.threads)
    pq.set_num_threads(args.threads)
    if not args.no_generation:
        generation(args, np, torch, pq)
    if args.coexist:
        coexist(args, np, torch, pq)
    if args.per_weight:
        per_weight(args, np, pq)
    if args.gemv_pairs:
        gemv_pairs(args, np, torch, pq)
    if args.cold:
        cold(args, np, torch, pq)
    if args.bf16_rows:
        bf16_rows(args, np, torch, pq)
    if args.train:
        training(args, np, torch, pq)
    if args.train_fp32:
        train_fp32(args, np, torch, pq)
    if args.fused_rows:
        fused_rows(args, np, torch, pq)
    if args.decode_shapes:
        decode_shapes(args, np, torch, pq)


if __name__ == "__main__":
    main()
