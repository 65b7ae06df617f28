"""The ``pyqlora`` command line."""
import argparse
import sys
import time

__all__ = ["main"]


def _demo(args):
    """Quantize a random Gaussian matrix with each codebook and compare them."""
    import numpy as np

    import pyqlora as pq

    rng = np.random.default_rng(args.seed)
    w = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    if args.dtype != "float32":
        w = w.astype(pq._dtypes.normalize_dtype(args.dtype))
    ref = w.astype(np.float64)
    norm = np.linalg.norm(ref)
    print(f"pyqlora {pq.__version__}: {args.rows}x{args.cols} N(0, 0.02) {args.dtype} matrix, blocksize {args.blocksize}")
    header = f"{'codebook':<10} {'DQ':<4} {'bits/param':>10} {'rel. error':>11} {'max |err|':>10} {'quantize':>9} {'dequantize':>11}"
    print(header)
    print("-" * len(header))
    rows = []
    for cb, dq in (("nf4", True), ("nf4", False), ("fp4", False), ("int4", False)):
        t0 = time.perf_counter()
        q = pq.quantize(w, codebook=cb, blocksize=args.blocksize, double_quant=dq)
        t1 = time.perf_counter()
        back = pq.dequantize(q, dtype=np.float32)
        t2 = time.perf_counter()
        diff = back.astype(np.float64) - ref
        rel = float(np.linalg.norm(diff) / norm)
        rows.append((cb, dq, q.bits_per_param, rel))
        print(
            f"{cb:<10} {'yes' if dq else 'no':<4} {q.bits_per_param:>10.3f} {rel:>11.4f} "
            f"{float(np.abs(diff).max()):>10.2e} {1e3 * (t1 - t0):>7.1f}ms {1e3 * (t2 - t1):>9.1f}ms"
        )
    best = min(rows, key=lambda r: r[3])
    print(f"lowest error: {best[0]}{' + DQ' if best[1] else ''} (relative error {best[3]:.4f})")
    return 0


def _config(args):
    import pyqlora as pq

    pq.show_config()
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pyqlora", description="QLoRA quantization tools (pyqlora / nf4core).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="quantize a random matrix with NF4, FP4 and INT4 and compare them")
    demo.add_argument("--rows", type=int, default=4096)
    demo.add_argument("--cols", type=int, default=4096)
    demo.add_argument("--blocksize", type=int, default=64)
    demo.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    cfg = sub.add_parser("config", help="show how pyqlora was built")
    cfg.set_defaults(func=_config)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "rows", 1) < 1 or getattr(args, "cols", 1) < 1:
        parser.error("--rows and --cols must be positive")
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        print(f"pyqlora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
