#!/usr/bin/env python
"""Quantize / dequantize throughput: pyqlora against bitsandbytes, torchao and plain torch.

    python benchmarks/bench_kernels.py [--sizes 4096x4096,16384x4096] [--dtypes float32,bfloat16]
        [--repeat 5] [--threads N] [--json PATH] [--plot PATH] [--markdown PATH] [--quick]

Everything is measured in one run, on one machine, with one thread count:

- four operations: NF4 quantize with double quantization (blocksize 64, DQ of the
  scales with the 8-bit dynamic map in blocks of 256, QLoRA's recipe); NF4
  dequantize (to the input dtype); 8-bit blockwise quantize with the signed dynamic
  map, blocksize 256; 8-bit dequantize (to the input dtype);
- on each matrix size and input dtype (float32, bfloat16);
- for each library: pyqlora, bitsandbytes (CPU backend), torchao (``to_nf4`` /
  ``NF4Tensor.get_original_weight`` for 4-bit, the 8-bit optimizer-state quantizer
  ``torchao.optim.quant_utils`` for 8-bit) and "plain torch", a vectorized torch
  implementation written for this benchmark (``PlainTorch`` in ``_bench/peers.py``);
- and this machine's memory copy bandwidth: the best of numpy ``copyto`` (one thread)
  and torch ``Tensor.copy_`` (all threads) on a 256 MiB buffer, counting read + write
  bytes. torch ``clone`` (allocation + copy) is reported beside them.

Byte model (GB/s and % of copy bandwidth). Every library is charged the bytes the
bitsandbytes format must move, whatever it does internally: the input read once and
the output written once, nothing for temporaries. With n parameters, itemsize s
(4 for float32, 2 for bfloat16) and nb = ceil(n / 64) blocks:

- NF4+DQ stored size = ceil(n/2) packed codes + nb one-byte DQ codes
  + 4 * ceil(nb / 256) nested scales + 4 (offset) ~= 0.516 B/param (4.127 bits);
- 8-bit stored size = n codes + 4 * ceil(n / 256) scales ~= 1.016 B/param;
- quantize moves s*n + stored bytes (float32 NF4: 4 + 0.516 = 4.516 B/param);
  dequantize moves stored + s*n bytes (the same figure in the other direction).

Gparam/s = n / best time / 1e9; GB/s = bytes moved / best time / 1e9; "% copy BW" =
GB/s / the copy bandwidth above; "pyqlora x" = the peer's best time / pyqlora's best
time for the same case (above 1: pyqlora is faster). Sizes that fit in the last-level
cache can exceed 100 %: the copy figure is measured on a buffer larger than that.

Threads. ``--threads N`` (default: the CPUs this process may run on) is set for every
library: OMP_NUM_THREADS, MKL_NUM_THREADS and OPENBLAS_NUM_THREADS are exported before
torch, bitsandbytes (whose CPU kernels use torch's OpenMP runtime) or torchao is
imported, ``torch.set_num_threads(N)`` is called, and ``pyqlora.set_num_threads(N)``
where pyqlora has it.

Timing. Each case is called once to warm up (page faults, lazy initialisation), then
timed with ``time.perf_counter`` up to ``--repeat`` times; the best time is reported and
every time is kept in the JSON. Peers get at most ``--peer-budget`` seconds of timed
calls per case (at least one call); a call whose warm-up takes more than
``--single-call`` seconds (20 by default) is measured once (the warm-up call is the
measurement), and the table says so. The outputs of one call are freed before the next.

Before timing, a guard checks that pyqlora and bitsandbytes agree within 1e-6
relative on the first size in float32 and stops the run if they do not (see
``_bench/guard.py``). A peer that is not installed is reported as "missing", a
case it cannot run as "failed: reason" or "n/a: reason"; nothing is skipped silently.

Outputs: the table on stdout; ``--json`` (all raw timings, machine, versions,
pyqlora's ``show_config()``, the command line); ``--plot`` (PNG, Gparam/s per library
on a log scale, with the copy-bandwidth bound of each operation); ``--markdown``
(the report kept as docs/performance.md).

This file is the command line and the issue's targets; the work is in ``_bench/``
(peers.py: the libraries; harness.py: timing; report.py and plot.py: the outputs;
benchmarks/README.md lists them all).
"""
import argparse
import datetime
import json
import os
import shlex
import sys
import time

# _bench is the folder beside this file (sys.path[0] when it runs as a script); none of
# its modules imports torch at module level, so set_thread_environment still comes first.
from _bench.guard import check_bit_compatibility
from _bench.harness import COPY_BUFFER_MIB, measure_copy_bandwidth, run_benchmarks
from _bench.machine import machine_info, pyqlora_config, versions
from _bench.operations import BLOCK_4BIT, BLOCK_8BIT, bytes_moved, itemsize
from _bench.peers import load_libraries
from _bench.plot import plot
from _bench.report import fmt_shape, format_text_table, table_rows, write_markdown
from _bench.targets import (
    cross_speedup,
    evaluate_targets,
    fraction_of_copy,
    min_speedup,
)
from _bench.threads import set_library_threads, set_thread_environment

DEFAULT_SIZES = "4096x4096,16384x4096"
QUICK_SIZES = "1024x1024,4096x4096"
DEFAULT_DTYPES = "float32,bfloat16"
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # git-ignored


# Issue 3's targets: same-run ratios at the largest size (16384x4096 by default), NF4 + DQ.
# They stay here, beside the command line: the Markdown report cites them as TARGETS in this file.
TARGETS = (
    ("NF4+DQ quantize >= 50x bitsandbytes (float32 and bfloat16)",
     min_speedup({"bitsandbytes"}, {"quantize4"}, 50.0, largest_only=True)),
    ("NF4+DQ dequantize >= 5x bitsandbytes (allocating the output)",
     min_speedup({"bitsandbytes"}, {"dequantize4"}, 5.0, largest_only=True)),
    ("NF4+DQ dequantize >= 5x bitsandbytes (pyqlora into out=; bitsandbytes allocating, "
     "as its out= is not implemented on CPU)",
     cross_speedup("dequantize4_out", "bitsandbytes", "dequantize4", 5.0)),
    ("NF4+DQ dequantize >= 70% of the measured copy bandwidth (allocating the output)",
     fraction_of_copy({"dequantize4"}, 0.70)),
    ("NF4+DQ dequantize >= 70% of the measured copy bandwidth (into out=)",
     fraction_of_copy({"dequantize4_out"}, 0.70)),
    ("8-bit blockwise quantize >= 5x bitsandbytes",
     min_speedup({"bitsandbytes"}, {"quantize8"}, 5.0, largest_only=True)),
    ("8-bit blockwise dequantize >= 5x bitsandbytes (allocating)",
     min_speedup({"bitsandbytes"}, {"dequantize8"}, 5.0, largest_only=True)),
    ("8-bit blockwise dequantize >= 5x bitsandbytes (pyqlora into out=; bitsandbytes allocating)",
     cross_speedup("dequantize8_out", "bitsandbytes", "dequantize8", 5.0)),
    ("faster than every peer in every case (not an issue target)",
     min_speedup({"bitsandbytes", "torchao", "plain torch"})),
)


def parse_size(text):
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not ROWSxCOLS")
    return rows, cols


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring and benchmarks/README.md for the byte model.")
    ap.add_argument("--sizes", default=None, help=f"comma-separated ROWSxCOLS (default {DEFAULT_SIZES})")
    ap.add_argument("--dtypes", default=DEFAULT_DTYPES, help=f"comma-separated input dtypes (default {DEFAULT_DTYPES})")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per case after one warm-up, best kept "
                                                             "(default 5; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads for every library (default: usable CPUs, here %(default)s)")
    ap.add_argument("--peer-budget", type=float, default=None,
                    help="max seconds of timed calls per case for the peers (default 10; 3 with --quick)")
    ap.add_argument("--single-call", type=float, default=20.0,
                    help="a call slower than this (s) is measured once (default %(default)s)")
    ap.add_argument("--json", default=os.path.join(RESULTS_DIR, "bench_kernels.json"),
                    help="raw results (default %(default)s; '' for none)")
    ap.add_argument("--plot", default=os.path.join(RESULTS_DIR, "bench_kernels.png"),
                    help="PNG plot (default %(default)s; '' for none)")
    ap.add_argument("--markdown", default="", help="also write the report as Markdown (docs/performance.md)")
    ap.add_argument("--banner", default="", help="a warning line for the top of the Markdown report")
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, --repeat 1: a smoke run")
    args = ap.parse_args(argv)
    args.sizes = [parse_size(s) for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)).split(",")]
    args.dtypes = [d.strip() for d in args.dtypes.split(",")]
    for d in args.dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            ap.error(f"dtype {d!r}: expected float32, bfloat16 or float16")
    args.repeat = args.repeat or (1 if args.quick else 5)
    args.peer_budget = args.peer_budget if args.peer_budget is not None else (3.0 if args.quick else 10.0)
    if args.threads < 1 or args.repeat < 1:
        ap.error("--threads and --repeat must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    set_thread_environment(args.threads)  # before any library with an OpenMP runtime is imported
    started = datetime.datetime.now()
    t_start = time.perf_counter()
    libraries = load_libraries()
    if libraries[0].missing:
        raise SystemExit(f"pyqlora itself cannot be imported: {libraries[0].missing}")
    threads = set_library_threads(args.threads)
    machine = machine_info()  # before the run: its load average says whether the machine was busy

    guard = check_bit_compatibility(args.sizes[0])
    print(guard.get("line", f"bit-compatibility check {guard['status']}"), flush=True)
    bw = measure_copy_bandwidth(max(args.repeat, 3))
    print(f"copy bandwidth ({COPY_BUFFER_MIB} MiB, read + write): numpy copyto {bw['numpy_copyto']:.1f} GB/s, "
          f"torch copy_ {bw['torch_copy_'] or 0:.1f} GB/s, torch clone {bw['torch_clone'] or 0:.1f} GB/s; "
          f"reference {bw['reference']:.1f} GB/s; threads {args.threads}", flush=True)

    results = []

    def on_result(r):
        results.append(r)
        figure = f"{1e3 * r.best:9.1f} ms ({len(r.times)} runs)" if r.times else r.status
        print(f"  {fmt_shape(r.shape):>11} {r.dtype:<9} {r.op.label:<18} {r.library:<13} {figure} {r.note}",
              flush=True)

    run_benchmarks(libraries, args, on_result)
    rows = table_rows(results, bw["reference"])
    print()
    print(format_text_table(rows))

    report = {
        "command": "python " + shlex.join(sys.argv), "python_executable": sys.executable,
        "cwd": os.getcwd(), "started": started.isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - t_start,
        "settings": {"sizes": args.sizes, "dtypes": args.dtypes, "repeat": args.repeat,
                     "peer_budget_s": args.peer_budget, "single_call_s": args.single_call, "banner": args.banner,
                     "blocksize_4bit": BLOCK_4BIT, "blocksize_8bit": BLOCK_8BIT},
        "threads": threads, "machine": machine, "versions": versions(),
        "pyqlora_config": pyqlora_config(), "copy_bandwidth_gb_s": bw, "guard": guard,
        "results": [{"op": r.op.key, "operation": r.op.label, "dtype": r.dtype, "shape": list(r.shape),
                     "library": r.library, "status": r.status, "note": r.note, "times_s": r.times,
                     "best_s": r.best, "params": r.n, "bytes_moved": bytes_moved(r.op, r.n, itemsize(r.dtype)),
                     "gparam_s": r.gparam_s() if r.times else None,
                     "gb_s": r.gb_s() if r.times else None,
                     "fraction_of_copy_bw": r.gb_s() / bw["reference"] if r.times else None}
                    for r in results],
        "table": rows,
    }
    report["targets"] = evaluate_targets(TARGETS, results, bw["reference"])
    print()
    for t in report["targets"]:
        print(f"target: {t['target']}: {t['met']} ({t['measured']})")
    title = (f"{report['machine']['cpu_model']}, {args.threads} threads, copy bandwidth {bw['reference']:.1f} GB/s; "
             f"pyqlora kernels: {report['pyqlora_config'].get('cpu_kernels')}")
    for path in (args.plot, args.json, args.markdown):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if args.plot:
        plot(results, bw["reference"], args.plot, title)
        print(f"plot: {args.plot}")
    report["duration_s"] = time.perf_counter() - t_start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"json: {args.json}")
    if args.markdown:
        write_markdown(args.markdown, report, rows, args.plot)
        print(f"markdown: {args.markdown}")
    print(f"total {report['duration_s']:.0f} s")


if __name__ == "__main__":
    main()
