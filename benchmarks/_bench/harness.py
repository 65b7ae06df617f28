"""How bench_kernels.py times: warm-up then best of N calls, the copy-bandwidth yardstick,
the inputs, and the loop over sizes, dtypes, libraries and operations."""
import gc
import time

import numpy as np

from .operations import OPS, Result

COPY_BUFFER_MIB = 256


def time_calls(fn, repeat, budget_s=None, single_call_s=None):
    """Warm up once, then up to ``repeat`` timed calls (fewer if they would exceed
    ``budget_s``). Returns (times, last output, note)."""
    t0 = time.perf_counter()
    out = fn()
    warm = time.perf_counter() - t0
    if single_call_s is not None and warm > single_call_s:
        return [warm], out, f"one call ({warm:.0f} s > {single_call_s:g} s): the warm-up call is the measurement"
    reps = repeat if budget_s is None else max(1, min(repeat, int(budget_s / max(warm, 1e-9))))
    times = []
    for _ in range(reps):
        out = None  # free the previous output first: each call pays for its own allocation
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    note = f"{reps} of {repeat} runs (time cap)" if reps < repeat else ""
    return times, out, note


def measure_copy_bandwidth(repeat):
    """GB/s of a plain memory copy (read + write bytes) on a buffer larger than the
    caches: numpy copyto (one thread), torch copy_ and clone (torch's threads)."""
    a = np.ones(COPY_BUFFER_MIB * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    moved = 2 * a.nbytes / 1e9
    bw = {"buffer_mib": COPY_BUFFER_MIB,
          "numpy_copyto": moved / min(time_calls(lambda: np.copyto(b, a), repeat)[0])}
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        bw["torch_copy_"] = moved / min(time_calls(lambda: tb.copy_(ta), repeat)[0])
        bw["torch_clone"] = moved / min(time_calls(ta.clone, repeat)[0])
    except ImportError:
        bw["torch_copy_"] = bw["torch_clone"] = None
    bw["reference"] = max(v for k, v in bw.items() if k in ("numpy_copyto", "torch_copy_") and v)
    return bw


def make_input(shape, dtype, seed=0):
    """N(0, 0.02^2) weights, the scale of an initialized linear layer."""
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    x *= 0.02
    if dtype == "bfloat16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16)
    return x.astype(dtype, copy=False)


def run_library(lib, x, args, on_result):
    """All four operations of one library on one input; each dequantize decodes the
    output of the same library's quantize."""
    peer = lib.name != "pyqlora"
    budget = args.peer_budget if peer else None
    dtype, shape = x.dtype.name, x.shape

    def new(op, **kw):
        on_result(Result(op, dtype, shape, lib.name, **kw))

    if lib.missing:
        for op in OPS:
            new(op, status=lib.missing)
        return
    xin = lib.as_input(x)
    for group in (OPS[0:3], OPS[3:6]):
        quantized = None
        for op in group:
            if not op.quantize and quantized is None:
                new(op, status="failed: its quantize did not run")
                continue
            if op.into and not lib.has_out:
                new(op, status="n/a: no out= parameter")
                continue
            arg = xin if op.quantize else (quantized, lib.empty_like(xin)) if op.into else quantized
            try:
                times, out, note = time_calls(lambda: lib.run(op, arg), args.repeat, budget, args.single_call)
            except Exception as exc:
                first_line = (str(exc).splitlines() or [""])[0][:120]
                new(op, status=f"failed: {type(exc).__name__}: {first_line}")
                continue
            new(op, times=times, note=note)
            if op.quantize:
                quantized = out
            del out
        del quantized
        gc.collect()


def run_benchmarks(libraries, args, on_result):
    for shape in args.sizes:
        for dtype in args.dtypes:
            x = make_input(shape, dtype)
            for lib in libraries:
                run_library(lib, x, args, on_result)
            del x
            gc.collect()
