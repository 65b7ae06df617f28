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
  implementation written here (``PlainTorch``);
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
``check_bit_compatibility``). A peer that is not installed is reported as "missing", a
case it cannot run as "failed: reason" or "n/a: reason"; nothing is skipped silently.

Outputs: the table on stdout; ``--json`` (all raw timings, machine, versions,
pyqlora's ``show_config()``, the command line); ``--plot`` (PNG, Gparam/s per library
on a log scale, with the copy-bandwidth bound of each operation); ``--markdown``
(the report kept as docs/performance.md).
"""
import argparse
import datetime
import gc
import importlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

DEFAULT_SIZES = "4096x4096,16384x4096"
QUICK_SIZES = "1024x1024,4096x4096"
DEFAULT_DTYPES = "float32,bfloat16"
COPY_BUFFER_MIB = 256
BLOCK_4BIT = 64  # QLoRA's blocksize
BLOCK_8BIT = 256  # QLoRA's DQ blocksize, also bitsandbytes' quantize_blockwise default
GUARD_RTOL = 1e-6
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # git-ignored
VERSIONED_PACKAGES = ("pyqlora", "numpy", "ml_dtypes", "torch", "bitsandbytes", "torchao", "matplotlib")


@dataclass(frozen=True)
class Op:
    key: str
    label: str
    bits: int
    quantize: bool  # False: dequantize the output of the same library's quantize
    into: bool = False  # dequantize into a preallocated output (out=), where the library has it


# Dequantize is measured twice: allocating its output, as a default call does (a fresh
# 256 MiB array costs the OS page faults and zeroing, the same for every library), and
# into a preallocated output (out=), which is what the kernel itself costs.
OPS = (
    Op("quantize4", "NF4+DQ quantize", 4, True),
    Op("dequantize4", "NF4+DQ dequantize", 4, False),
    Op("dequantize4_out", "NF4+DQ dequantize out=", 4, False, True),
    Op("quantize8", "8-bit quantize", 8, True),
    Op("dequantize8", "8-bit dequantize", 8, False),
    Op("dequantize8_out", "8-bit dequantize out=", 8, False, True),
)


# ------------------------------------------------------------------ byte model
def stored_bytes(bits, n):
    """Bytes of the quantized form of n parameters (the bitsandbytes layout)."""
    if bits == 4:
        nb = -(-n // BLOCK_4BIT)
        return -(-n // 2) + nb + 4 * -(-nb // BLOCK_8BIT) + 4
    return n + 4 * -(-n // BLOCK_8BIT)


def bytes_moved(op, n, itemsize):
    """Input read once + output written once (see the module docstring)."""
    return n * itemsize + stored_bytes(op.bits, n)


# ------------------------------------------------------------------ libraries
class Library:
    """Adapter: one library's four operations on its native array type.

    ``load`` imports the library (an ImportError is reported as missing); ``as_input``
    converts a NumPy array, untimed; ``quantize*`` return whatever ``dequantize*`` of
    the same adapter takes, and ``dequantize*`` returns the input's dtype.
    """

    name = "?"

    def load(self):
        raise NotImplementedError

    def as_input(self, x):
        return x

    def run(self, op, arg):
        return getattr(self, op.key)(arg)


class PyQLoRA(Library):
    name = "pyqlora"

    def load(self):
        self.pq = importlib.import_module("pyqlora")

    def quantize4(self, x):
        return self.pq.quantize(x, codebook="nf4", blocksize=BLOCK_4BIT, double_quant=True)

    def dequantize4(self, q):
        return self.pq.dequantize(q)

    def dequantize4_out(self, arg):
        q, out = arg
        return self.pq.dequantize(q, out=out)

    def quantize8(self, x):
        codes, absmax = self.pq.quantize_blockwise(x, blocksize=BLOCK_8BIT, codebook="dynamic")
        return codes, absmax, x.dtype

    def dequantize8(self, q):
        codes, absmax, dtype = q
        return self.pq.dequantize_blockwise(codes, absmax, blocksize=BLOCK_8BIT, dtype=dtype)

    def dequantize8_out(self, arg):
        (codes, absmax, dtype), out = arg
        return self.pq.dequantize_blockwise(codes, absmax, blocksize=BLOCK_8BIT, out=out)

    def empty_like(self, x):
        return np.empty_like(x)


class TorchLibrary(Library):
    """Shared by the torch-based peers: zero-copy NumPy -> torch input."""

    def load(self):
        self.torch = importlib.import_module("torch")

    def as_input(self, x):
        return numpy_to_torch(self.torch, x)


class BitsAndBytes(TorchLibrary):
    name = "bitsandbytes"

    def load(self):
        super().load()
        self.F = importlib.import_module("bitsandbytes.functional")

    def quantize4(self, x):
        return self.F.quantize_4bit(x, blocksize=BLOCK_4BIT, quant_type="nf4", compress_statistics=True)

    def dequantize4(self, q):
        return self.F.dequantize_4bit(*q)

    def dequantize4_out(self, arg):
        (packed, state), out = arg
        return self.F.dequantize_4bit(packed, state, out=out)

    def quantize8(self, x):
        return self.F.quantize_blockwise(x, blocksize=BLOCK_8BIT)

    def dequantize8(self, q):
        return self.F.dequantize_blockwise(*q)

    def dequantize8_out(self, arg):
        (codes, state), out = arg
        return self.F.dequantize_blockwise(codes, state, out=out)

    def empty_like(self, x):
        return self.torch.empty_like(x)


class TorchAO(TorchLibrary):
    """torchao's NF4Tensor (its DQ is a linear int8 code: not bitsandbytes' bytes, the same
    amount of work) and, for 8-bit, the blockwise dynamic-map quantizer of its 8-bit
    optimizers (division by the block absmax, binary search over the map)."""

    name = "torchao"

    def load(self):
        super().load()
        importlib.import_module("torchao")  # not installed: say so, not that a submodule is missing
        try:
            self.to_nf4 = importlib.import_module("torchao.quantization").to_nf4
        except (ImportError, AttributeError):  # torchao < 0.13 kept it in torchao.dtypes
            self.to_nf4 = importlib.import_module("torchao.dtypes.nf4tensor").to_nf4
        self.qu = importlib.import_module("torchao.optim.quant_utils")
        self.qmap = self.torch.tensor(self.qu.create_dynamic_map(signed=True), dtype=self.torch.float32)

    def quantize4(self, x):
        return self.to_nf4(x, block_size=BLOCK_4BIT, scaler_block_size=BLOCK_8BIT)

    def dequantize4(self, q):
        return q.get_original_weight()

    def quantize8(self, x):
        scaled, scale = self.qu.scale_tensor(x, BLOCK_8BIT)
        return self.qu.quantize_8bit_with_qmap(scaled, self.qmap), scale, x.dtype

    def dequantize8(self, q):
        codes, scale, dtype = q
        return self.qu.dequant_with_qmap(codes, self.qmap, scale).to(dtype)


class PlainTorch(TorchLibrary):
    """NF4+DQ and 8-bit blockwise quantization as a competent torch user writes them:
    vectorized over blocks, ``torch.bucketize`` over the midpoints of the sorted table
    (ties to the lower code, as bitsandbytes' reference), two codes per byte with the
    even element in the high nibble, and DQ of the scales (minus their mean) with the
    8-bit code in blocks of 256, exactly as bitsandbytes and pyqlora store them.
    The tables are pyqlora's (equal to bitsandbytes'); only their use is timed."""

    name = "plain torch"

    def load(self):
        super().load()
        pq = importlib.import_module("pyqlora")
        torch = self.torch
        self.nf4 = torch.from_numpy(np.asarray(pq.codebook("nf4"), np.float32))
        self.dyn = torch.from_numpy(np.asarray(pq.dynamic_codebook(signed=True), np.float32))
        self.nf4_mid = (self.nf4[:-1] + self.nf4[1:]) / 2
        self.dyn_mid = (self.dyn[:-1] + self.dyn[1:]) / 2

    def _blocks(self, flat, blocksize):
        pad = -flat.numel() % blocksize
        if pad:
            flat = self.torch.nn.functional.pad(flat, (0, pad))
        return flat.view(-1, blocksize)

    def _quantize_blocks(self, flat, blocksize, midpoints):
        blocks = self._blocks(flat.float(), blocksize)
        absmax = blocks.abs().amax(dim=1)
        scaled = blocks * (1.0 / absmax.clamp_min(1e-38)).unsqueeze(1)
        codes = self.torch.bucketize(scaled, midpoints, out_int32=True).to(self.torch.uint8)
        return codes, absmax

    def quantize8(self, x):
        codes, absmax = self._quantize_blocks(x.reshape(-1), BLOCK_8BIT, self.dyn_mid)
        return codes.view(-1)[: x.numel()], absmax, x.shape, x.dtype

    def dequantize8(self, q):
        codes, absmax, shape, dtype = q
        out = self.dyn[self._blocks(codes, BLOCK_8BIT).int()] * absmax.unsqueeze(1)
        return out.view(-1)[: math.prod(shape)].to(dtype).view(shape)

    def quantize4(self, x):
        codes, absmax = self._quantize_blocks(x.reshape(-1), BLOCK_4BIT, self.nf4_mid)
        codes = codes.view(-1)[: x.numel()]
        if codes.numel() % 2:
            codes = self.torch.nn.functional.pad(codes, (0, 1), value=7)  # NF4's code of 0.0
        packed = (codes[0::2] << 4) | codes[1::2]
        offset = absmax.mean()
        return packed, self.quantize8(absmax - offset), offset, x.shape, x.dtype

    def dequantize4(self, q):
        packed, dq, offset, shape, dtype = q
        absmax = self.dequantize8(dq) + offset
        codes = self.torch.stack((packed >> 4, packed & 15), dim=1).view(-1)
        out = self.nf4[self._blocks(codes, BLOCK_4BIT).int()] * absmax.unsqueeze(1)
        return out.view(-1)[: math.prod(shape)].to(dtype).view(shape)


LIBRARIES = (PyQLoRA, BitsAndBytes, TorchAO, PlainTorch)


def numpy_to_torch(torch, x):
    if x.dtype.name == "bfloat16":  # torch cannot take ml_dtypes' bfloat16 directly
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def load_libraries():
    """Each adapter loaded, or the reason it is missing (the import error)."""
    loaded = []
    # bitsandbytes and torchao log warnings about optional kernels (CUDA, kernels-community) on import
    logging.disable(logging.WARNING)
    try:
        for cls in LIBRARIES:
            lib = cls()
            try:
                lib.load()
                lib.missing = None
            except Exception as exc:  # ImportError, or a broken install (OSError from a .so)
                lib.missing = f"missing ({type(exc).__name__}: {exc})"
            loaded.append(lib)
    finally:
        logging.disable(logging.NOTSET)
    return loaded


# ------------------------------------------------------------------ threads
def set_thread_environment(threads):
    """Must run before torch, bitsandbytes or torchao is imported: their OpenMP runtime
    reads OMP_NUM_THREADS once, when it starts."""
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(threads)


def set_library_threads(threads):
    """The run-time half: torch's intra-op pool and pyqlora's pool, where it has one."""
    report = {"requested": threads}
    import pyqlora as pq

    if hasattr(pq, "set_num_threads"):
        pq.set_num_threads(threads)
        report["pyqlora"] = pq.get_num_threads()
    else:
        report["pyqlora"] = "no set_num_threads (single-threaded kernels)"
    try:
        import torch

        torch.set_num_threads(threads)
        report["torch"] = torch.get_num_threads()
    except ImportError:
        report["torch"] = "missing"
    report.update({var: os.environ.get(var) for var in THREAD_ENV_VARS})
    return report


# ------------------------------------------------------------------ timing
@dataclass
class Result:
    op: Op
    dtype: str
    shape: tuple
    library: str
    status: str = "ok"  # or "missing (...)", "failed: ...", "n/a: ..."
    times: list = field(default_factory=list)
    note: str = ""

    @property
    def n(self):
        return math.prod(self.shape)

    @property
    def best(self):
        return min(self.times) if self.times else None

    def gparam_s(self):
        return self.n / self.best / 1e9

    def gb_s(self):
        return bytes_moved(self.op, self.n, itemsize(self.dtype)) / self.best / 1e9


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


# ------------------------------------------------------------------ the run
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
            if op.into and not hasattr(lib, op.key):
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


# ------------------------------------------------------------------ guard
def check_bit_compatibility(shape):
    """pyqlora against bitsandbytes on one float32 matrix, within GUARD_RTOL relative:

    1. NF4 without DQ: each library dequantizes its own quantization;
    2. NF4+DQ: each dequantizes the other's bytes (checkpoint dictionaries), and
       pyqlora's own round trip equals bitsandbytes' decoding of pyqlora's bytes;
    3. 8-bit: bitsandbytes decodes pyqlora's codes.

    With DQ the libraries' own quantizations need not agree byte for byte on CPU:
    bitsandbytes' 8-bit CPU kernel (used for the DQ codes) picks the second-nearest
    code for inputs within 3e-5 of a midpoint (docs/format.md, section 6); the number
    of such scales is reported, not failed. Returns a dict; raises SystemExit on a
    mismatch.
    """
    try:
        import torch
        import bitsandbytes.functional as F
    except ImportError as exc:
        return {"status": f"skipped: bitsandbytes missing ({exc})"}
    import pyqlora as pq

    x = make_input(shape, "float32", seed=1)
    xt = torch.from_numpy(x)
    failures = []

    def same(name, ours, theirs):
        theirs = theirs.numpy() if isinstance(theirs, torch.Tensor) else theirs
        if not np.allclose(ours, theirs, rtol=GUARD_RTOL, atol=0):
            worst = np.max(np.abs(ours - theirs) / np.maximum(np.abs(theirs), np.finfo(np.float32).tiny))
            failures.append(f"{name}: max relative difference {worst:.3g}")

    packed, state = F.quantize_4bit(xt, blocksize=BLOCK_4BIT, quant_type="nf4", compress_statistics=False)
    q = pq.quantize(x, codebook="nf4", blocksize=BLOCK_4BIT, double_quant=False)
    same("NF4 round trip", pq.dequantize(q), F.dequantize_4bit(packed, state))

    packed, state = F.quantize_4bit(xt, blocksize=BLOCK_4BIT, quant_type="nf4", compress_statistics=True)
    q = pq.quantize(x, codebook="nf4", blocksize=BLOCK_4BIT, double_quant=True)
    theirs_as_ours = pq.QuantizedArray.from_bnb_dict(
        {"w": packed, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}, prefix="w")
    same("NF4+DQ, bitsandbytes' bytes", pq.dequantize(theirs_as_ours), F.dequantize_4bit(packed, state))
    ours_dict = {k: torch.from_numpy(v) for k, v in q.to_bnb_dict("w").items()}
    ours_state = F.QuantState.from_dict({k[2:]: v for k, v in ours_dict.items() if k != "w"}, device="cpu")
    same("NF4+DQ, pyqlora's bytes", pq.dequantize(q), F.dequantize_4bit(ours_dict["w"], ours_state))
    dq_codes_differ = int(np.count_nonzero(q.absmax != state.absmax.numpy()))

    codes, absmax = pq.quantize_blockwise(x, blocksize=BLOCK_8BIT)
    same("8-bit, pyqlora's codes", pq.dequantize_blockwise(codes, absmax, blocksize=BLOCK_8BIT),
         F.dequantize_blockwise(torch.from_numpy(codes), absmax=torch.from_numpy(absmax),
                                code=F.create_dynamic_map(signed=True), blocksize=BLOCK_8BIT))

    case = f"{shape[0]}x{shape[1]} float32"
    if failures:
        raise SystemExit(f"bit-compatibility check FAILED on {case}: pyqlora and bitsandbytes differ by "
                         f"more than {GUARD_RTOL:g} relative: " + "; ".join(failures))
    nb = state.absmax.numel()
    return {"status": "ok", "case": case, "rtol": GUARD_RTOL,
            "dq_codes_where_bnb_cpu_kernel_differs": dq_codes_differ, "dq_codes": nb,
            "line": f"bit-compatibility check ({case}): pyqlora == bitsandbytes within {GUARD_RTOL:g} relative "
                    f"(NF4 round trips; NF4+DQ bytes decoded both ways; 8-bit codes). bitsandbytes' CPU kernel "
                    f"chose a second-nearest DQ code for {dq_codes_differ} of {nb} scales (docs/format.md, section 6)."}


# ------------------------------------------------------------------ machine
def machine_info():
    info = {"platform": platform.platform(), "python": sys.version.split()[0],
            "cpus_online": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "load_average_1_5_15_min": os.getloadavg()}  # other work on the machine skews the figures
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
    except (OSError, subprocess.SubprocessError):
        pass
    flags = set(fields.get("Flags", "").split())
    info["cpu_model"] = fields.get("Model name", platform.processor() or "unknown")
    info["cores_per_socket"] = fields.get("Core(s) per socket")
    info["threads_per_core"] = fields.get("Thread(s) per core")
    info["l3_cache"] = fields.get("L3 cache")
    info["hypervisor"] = fields.get("Hypervisor vendor")
    interesting = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx_vnni",
                   "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
    info["cpu_flags"] = [f for f in interesting if f in flags]
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def versions():
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def pyqlora_config():
    import pyqlora as pq

    with open(os.devnull, "w") as devnull:
        return pq.show_config(file=devnull)


# ------------------------------------------------------------------ reporting
def fmt_shape(shape):
    return "x".join(map(str, shape))


def itemsize(dtype):
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def table_rows(results, copy_bw):
    """One dict of display strings per result, in run order, grouped by case."""
    pyq = {(r.op.key, r.dtype, r.shape): r for r in results if r.library == "pyqlora" and r.times}
    cases = sorted({(r.shape, r.dtype, r.op.key) for r in results},
                   key=lambda c: (math.prod(c[0]), c[1] != "float32", [o.key for o in OPS].index(c[2])))
    rows = []
    for shape, dtype, key in cases:
        for r in (r for r in results if (r.shape, r.dtype, r.op.key) == (shape, dtype, key)):
            row = {"operation": r.op.label, "dtype": r.dtype, "shape": fmt_shape(r.shape), "library": r.library}
            if r.times:
                base = pyq.get((key, dtype, shape))
                row.update({
                    "runs": str(len(r.times)), "best ms": f"{1e3 * r.best:.1f}",
                    "Gparam/s": f"{r.gparam_s():.3f}", "GB/s": f"{r.gb_s():.2f}",
                    "% copy BW": f"{100 * r.gb_s() / copy_bw:.0f}%",
                    "pyqlora x": "" if r.library == "pyqlora" or base is None else f"{r.best / base.best:.2f}",
                    "note": r.note})
            else:
                row["note"] = r.status
            rows.append(row)
    return rows


COLUMNS = ("operation", "dtype", "shape", "library", "runs", "best ms", "Gparam/s", "GB/s", "% copy BW",
           "pyqlora x", "note")


def format_text_table(rows):
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in COLUMNS[:-1]}
    numeric = set(COLUMNS[4:-1])
    lines = []
    for row in [dict(zip(COLUMNS, COLUMNS))] + rows:
        cells = [row.get(c, "").rjust(widths[c]) if c in numeric else row.get(c, "").ljust(widths[c])
                 for c in COLUMNS[:-1]]
        lines.append("  ".join(cells + [row.get("note", "")]).rstrip())
    lines.insert(1, "-" * max(map(len, lines)))
    return "\n".join(lines)


def format_markdown_table(rows):
    numeric = set(COLUMNS[4:-1])
    out = ["| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join("---:" if c in numeric else "---" for c in COLUMNS) + "|"]
    out += ["| " + " | ".join(r.get(c, "").replace("|", "/") for c in COLUMNS) + " |" for r in rows]
    return "\n".join(out)


def plot(results, copy_bw, path, title):
    """Grouped bars, one panel per size: Gparam/s of each library for each operation and
    dtype on a log scale; a dashed segment marks the copy-bandwidth bound of the group
    (copy GB/s / bytes moved per parameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r.shape for r in results}, key=math.prod)
    dtypes = list(dict.fromkeys(r.dtype for r in results))
    libs = list(dict.fromkeys(r.library for r in results))
    groups = [(op, dt) for op in OPS for dt in dtypes]
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(libs)
    fig, axes = plt.subplots(len(shapes), 1, figsize=(max(8, 1.4 * len(groups)), 4.2 * len(shapes)),
                             squeeze=False)
    for ax, shape in zip(axes[:, 0], shapes):
        by_key = {(r.op.key, r.dtype, r.library): r for r in results if r.shape == shape}
        values = [r.gparam_s() for r in by_key.values() if r.times]
        floor = min(values, default=1e-3) / 4
        n = math.prod(shape)
        for g, (op, dt) in enumerate(groups):
            bound = copy_bw * n / bytes_moved(op, n, itemsize(dt))
            ax.hlines(bound, g - 0.45, g + 0.45, colors="black", linestyles="dashed", linewidth=1,
                      label="copy-bandwidth bound" if g == 0 else None)
            for i, lib in enumerate(libs):
                r = by_key.get((op.key, dt, lib))
                xpos = g - 0.4 + width * (i + 0.5)
                if r is not None and r.times:
                    ax.bar(xpos, r.gparam_s(), width, color=colors[i], label=lib if g == 0 else None)
                else:
                    text = "n/a" if r is None else r.status.split(":")[0].split(" (")[0]
                    ax.bar(xpos, 0, width, color=colors[i], label=lib if g == 0 else None)
                    ax.text(xpos, floor * 1.1, text, rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{op.label}\n{dt}" for op, dt in groups], fontsize=8)
        ax.set_ylabel("Gparam/s (log scale, higher is better)")
        ax.set_title(f"{fmt_shape(shape)} matrix", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=len(libs) + 1, fontsize=8,
               bbox_to_anchor=(0.5, 1 - 0.35 / fig.get_figheight()))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---- targets (issue 3): (description, function(results, copy_bw) -> (measured text, met: True/False/None)).
# Keep the descriptions and thresholds in step with the wording.
def _speedups(results, peers):
    pyq = {(r.op.key, r.dtype, r.shape): r.best for r in results if r.library == "pyqlora" and r.times}
    return [(r.best / pyq[(r.op.key, r.dtype, r.shape)], r) for r in results
            if r.library in peers and r.times and (r.op.key, r.dtype, r.shape) in pyq]


def _largest(results):
    return max((r.shape for r in results), key=math.prod, default=None)


def _min_speedup(peers, op_keys=None, threshold=1.0, largest_only=False):
    def check(results, copy_bw):
        big = _largest(results)
        pairs = [(x, r) for x, r in _speedups(results, peers)
                 if (op_keys is None or r.op.key in op_keys) and (not largest_only or r.shape == big)]
        if not pairs:
            return "no measured pair", None
        worst, r = min(pairs, key=lambda p: p[0])
        return (f"slowest ratio {worst:.1f}x ({r.library}, {r.op.label}, {r.dtype}, {fmt_shape(r.shape)})",
                worst >= threshold)
    return check


def _cross_speedup(mine_key, peer, peer_key, threshold):
    """pyqlora's `mine_key` against the peer's `peer_key` (e.g. its only working variant)."""
    def check(results, copy_bw):
        big = _largest(results)
        pairs = []
        for r in results:
            if r.library == "pyqlora" and r.op.key == mine_key and r.shape == big and r.times:
                theirs = [p for p in results if p.library == peer and p.op.key == peer_key and p.shape == big
                          and p.dtype == r.dtype and p.times]
                pairs += [(p.best / r.best, r) for p in theirs]
        if not pairs:
            return "no measured pair", None
        worst, r = min(pairs, key=lambda p: p[0])
        return f"slowest ratio {worst:.1f}x ({r.dtype}, {fmt_shape(r.shape)})", worst >= threshold
    return check


def _fraction_of_copy(op_keys, fraction):
    def check(results, copy_bw):
        big = _largest(results)
        mine = [r for r in results if r.library == "pyqlora" and r.times and r.shape == big and r.op.key in op_keys]
        if not mine:
            return "not measured", None
        worst = min(mine, key=lambda r: r.gb_s())
        frac = worst.gb_s() / copy_bw
        return f"lowest {100 * frac:.0f}% ({worst.op.label}, {worst.dtype}, {fmt_shape(big)})", frac >= fraction
    return check


# Issue 3's targets: same-run ratios at the largest size (16384x4096 by default), NF4 + DQ.
TARGETS = (
    ("NF4+DQ quantize >= 50x bitsandbytes (float32 and bfloat16)",
     _min_speedup({"bitsandbytes"}, {"quantize4"}, 50.0, largest_only=True)),
    ("NF4+DQ dequantize >= 5x bitsandbytes (allocating the output)",
     _min_speedup({"bitsandbytes"}, {"dequantize4"}, 5.0, largest_only=True)),
    ("NF4+DQ dequantize >= 5x bitsandbytes (pyqlora into out=; bitsandbytes allocating, "
     "as its out= is not implemented on CPU)",
     _cross_speedup("dequantize4_out", "bitsandbytes", "dequantize4", 5.0)),
    ("NF4+DQ dequantize >= 70% of the measured copy bandwidth (allocating the output)",
     _fraction_of_copy({"dequantize4"}, 0.70)),
    ("NF4+DQ dequantize >= 70% of the measured copy bandwidth (into out=)",
     _fraction_of_copy({"dequantize4_out"}, 0.70)),
    ("8-bit blockwise quantize >= 5x bitsandbytes",
     _min_speedup({"bitsandbytes"}, {"quantize8"}, 5.0, largest_only=True)),
    ("8-bit blockwise dequantize >= 5x bitsandbytes (allocating)",
     _min_speedup({"bitsandbytes"}, {"dequantize8"}, 5.0, largest_only=True)),
    ("8-bit blockwise dequantize >= 5x bitsandbytes (pyqlora into out=; bitsandbytes allocating)",
     _cross_speedup("dequantize8_out", "bitsandbytes", "dequantize8", 5.0)),
    ("faster than every peer in every case (not an issue target)",
     _min_speedup({"bitsandbytes", "torchao", "plain torch"})),
)


def evaluate_targets(results, copy_bw):
    out = []
    for description, check in TARGETS:
        measured, met = check(results, copy_bw)
        out.append({"target": description, "measured": measured,
                    "met": {True: "met", False: "missed", None: "not measured"}[met]})
    return out


def write_markdown(path, report, rows, plot_path):
    m, cfg, bw = report["machine"], report["pyqlora_config"], report["copy_bandwidth_gb_s"]
    kernels = str(cfg.get("cpu_kernels", "?"))
    lines = ["# Performance: quantize and dequantize kernels", ""]
    if report["settings"]["banner"]:
        lines += [f"> **{report['settings']['banner']}**", ""]
    lines += [f"Generated by `benchmarks/bench_kernels.py` on {report['started'][:10]}; "
              "`benchmarks/README.md` explains the columns and the byte model.", "",
              "## Command", "", "```bash", report["command"], "```", "",
              f"Threads: {report['threads']['requested']} for every library. Best of "
              f"{report['settings']['repeat']} timed run(s) after one warm-up (peers capped at "
              f"{report['settings']['peer_budget_s']:g} s of timed calls per case). Total run time "
              f"{report['duration_s'] / 60:.1f} min.", "",
              "## Machine", "",
              "| | |", "|---|---|",
              f"| CPU | {m['cpu_model']} ({m.get('hypervisor') or 'bare metal'}), {m['cpus_usable']} usable CPUs, "
              f"L3 {m.get('l3_cache')} |",
              f"| SIMD flags | {', '.join(m['cpu_flags']) or 'none of interest'} |",
              f"| memory | {m.get('memory_gib')} GiB |",
              "| load average at start (1, 5, 15 min) | "
              + ", ".join(f"{v:.2f}" for v in m["load_average_1_5_15_min"]) + " |",
              f"| copy bandwidth ({bw['buffer_mib']} MiB, read + write) | numpy copyto {bw['numpy_copyto']:.1f} GB/s, "
              f"torch copy_ {bw['torch_copy_'] or 0:.1f} GB/s, torch clone {bw['torch_clone'] or 0:.1f} GB/s; "
              f"reference **{bw['reference']:.1f} GB/s** |",
              "| versions | " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + " |",
              f"| pyqlora kernels | {kernels}, threads {cfg.get('threads')} |", "",
              "## Results", "", report["guard"].get("line", report["guard"]["status"]), "",
              format_markdown_table(rows), ""]
    if plot_path:
        rel = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(path)))
        lines += [f"![Gparam/s per library, log scale; dashed: copy-bandwidth bound]({rel})", ""]
    lines += ["## Targets (issue 3)", "",
              "As encoded in `TARGETS` in `benchmarks/bench_kernels.py`; bandwidth targets use pyqlora's "
              "figures at the largest size measured.", "",
              "| target | measured | met? |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['met']} |" for t in report["targets"]]
    lines += ["", "## Notes", "",
              "- Bytes moved are the bitsandbytes format's: input read once, output written once "
              "(NF4+DQ ~0.516 B/param, 8-bit ~1.016 B/param, plus 4 or 2 B/param of float32 or bfloat16); "
              "temporaries are not counted, so \"% copy BW\" is what the format allows, not what a library "
              "actually moves.",
              "- The copy-bandwidth reference is the better of numpy copyto (one thread) and torch copy_ "
              f"({report['threads']['requested']} threads) on a {bw['buffer_mib']} MiB buffer. Inputs that fit "
              "in the last-level cache can run above 100 %.",
              "- torchao: 4-bit is `to_nf4` / `get_original_weight` (its DQ uses a linear int8 code, not "
              "bitsandbytes' bytes); 8-bit is its optimizer-state quantizer (`torchao.optim.quant_utils`).",
              "- plain torch: vectorized `bucketize` over the table midpoints, with DQ of the scales "
              "(bitsandbytes' layout); see `PlainTorch` in the script.",
              "- Dequantize decodes the output of the same library's quantize, into the input dtype, "
              "allocating its output (as every library's default call does)."]
    load = m["load_average_1_5_15_min"][0]
    if load > 0.25 * m["cpus_usable"]:
        lines += [f"- The machine was busy when the run started (load average {load:.2f} on {m['cpus_usable']} "
                  "CPUs): expect noise, and compare libraries within this run only."]
    lines += [f"- {r['library']}, {r['operation']}, {r['dtype']}, {r['shape']}: {r['note']}"
              for r in rows if r.get("note")]
    # keep the hand-written part of an existing report (analysis of the results)
    kept = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if HAND_WRITTEN in old:
            kept = old[old.index(HAND_WRITTEN):]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))


# Everything from this line on in the Markdown report is written by hand and
# survives regeneration.
HAND_WRITTEN = "<!-- hand-written below: kept when the report is regenerated -->"


# ------------------------------------------------------------------ main
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
    report["targets"] = evaluate_targets(results, bw["reference"])
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
